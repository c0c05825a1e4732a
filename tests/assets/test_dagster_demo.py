"""One demo command: ``melanoma-ml demo --dagster`` (what ``./dev demo`` runs) hands its settings to Dagster.

The whole-graph materialization itself is tested in test_dagster_graph.py; here what the command passes
on, what it refuses, which instance it uses without DAGSTER_HOME and what it prints.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from melanoma_assets import demo
from melanoma_ml import cli
from melanoma_ml.errors import InputValueError

REPO = Path(__file__).resolve().parents[2]


def test_demo_dagster_passes_profile_and_overrides_to_the_dagster_demo(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(
        demo, "materialize_demo", lambda profile, overrides, events: calls.append((profile, overrides)) or 0
    )
    argv = [
        "demo",
        "--dagster",
        "--profile",
        "tiny",
        "--set",
        "training.epochs=2",
        "--artifact-root",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    assert calls == [("tiny", {"training": {"epochs": 2}, "artifact_root": str(tmp_path)})]


def test_demo_dagster_refuses_overrides_that_would_change_the_partitions(tmp_path, capsys) -> None:
    with pytest.raises(InputValueError, match="backbones and data.n_folds come from profile 'tiny'"):
        demo.materialize_demo("tiny", {"data": {"n_folds": 3}, "artifact_root": str(tmp_path)})
    backbones = 'backbones=["test_resnet"]'
    argv = ["demo", "--dagster", "--profile", "tiny", "--set", backbones, "--artifact-root", str(tmp_path)]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    assert "fix the training partitions" in capsys.readouterr().err
    assert not (tmp_path / "tables").exists()  # refused before any step ran


def test_dev_demo_runs_the_cli_demo_through_dagster() -> None:
    """``./dev demo`` uses the one demo entry point, then opens the UI on the same instance."""
    recipe = (REPO / "dev").read_text().split("\n  demo)\n", 1)[1].split(";;", 1)[0]
    lines = [line.strip() for line in recipe.strip().splitlines()]
    assert lines[1].startswith(".venv/bin/melanoma-ml demo --dagster "), lines
    assert lines[2] == "exec .venv/bin/dagster dev -w workspace.yaml"


@pytest.fixture
def no_dagster_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A shell outside ./dev: no DAGSTER_HOME, the current folder a fresh one under tmp_path."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_without_dagster_home_outside_the_project_it_says_how_to_set_it(no_dagster_home, capsys) -> None:
    argv = ["demo", "--dagster", "--profile", "tiny", "--artifact-root", str(no_dagster_home / "a")]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "DAGSTER_HOME is not set" in err and "export DAGSTER_HOME=" in err and "Traceback" not in err
    assert not (no_dagster_home / "a").exists() and not (no_dagster_home / ".dagster_home").exists()


@pytest.mark.parametrize("home", ["relative/home", "{tmp}/missing"])
def test_a_dagster_home_that_is_no_folder_is_refused_with_the_fix(no_dagster_home, monkeypatch, home) -> None:
    monkeypatch.setenv("DAGSTER_HOME", home.format(tmp=no_dagster_home))
    with pytest.raises(InputValueError, match="is not an existing absolute folder: create it and copy"):
        demo.demo_instance()


def test_without_dagster_home_in_the_project_folder_it_uses_the_default_home(no_dagster_home) -> None:
    (no_dagster_home / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())
    said: list[str] = []
    with demo.demo_instance(said.append) as instance:
        home = no_dagster_home / demo.DEFAULT_HOME
        assert Path(instance.root_directory).resolve() == home.resolve()
        assert (home / "dagster.yaml").read_bytes() == (REPO / "dagster.yaml").read_bytes()
        assert instance.run_monitoring_enabled  # the project's settings, not Dagster's defaults
    assert said == [f"[dagster] DAGSTER_HOME is not set: runs are kept in {home} (as ./dev does)"]


def test_the_full_profile_without_data_is_refused_before_any_run(no_dagster_home, capsys) -> None:
    argv = ["demo", "--dagster", "--profile", "full", "--artifact-root", str(no_dagster_home / "a")]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set data.source_dir=PATH" in err and "MELANOMA_DATA__SOURCE_DIR" in err


def test_events_flag_sets_the_console_level_of_the_runs(tmp_path, monkeypatch) -> None:
    levels = []

    def fake_graph(defs, resources, instance, progress, *, console_log_level):
        levels.append(console_log_level)
        return _FailedRun()

    monkeypatch.setattr(demo, "materialize_graph", fake_graph)
    monkeypatch.setattr(demo, "demo_instance", lambda progress: contextlib.nullcontext(None))
    for events in (False, True):
        demo.materialize_demo("tiny", {"artifact_root": str(tmp_path)}, events=events)
    assert levels == [demo.QUIET_LOG_LEVEL, None]


class _FailedRun:
    success = False


DEBUG_EVENT = re.compile(r" - dagster - DEBUG - ")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readme_command_prints_stage_lines_not_the_event_stream(no_dagster_home) -> None:
    """``melanoma-ml demo --dagster`` outside ./dev: project default home, a few lines; every event stored."""
    (no_dagster_home / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MELANOMA_", "DAGSTER_HOME"))}
    env["DAGSTER_DISABLE_TELEMETRY"] = "1"
    argv = ["demo", "--dagster", "--profile", "tiny", "--artifact-root", str(no_dagster_home / "artifacts")]
    proc = subprocess.run(
        [sys.executable, "-m", "melanoma_ml", *argv],
        cwd=no_dagster_home,
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-40:])
    assert not [line for line in lines if DEBUG_EVENT.search(line)]
    stages = [line for line in lines if line.startswith("[dagster] ") and line.endswith(" ...")]
    assert stages == [
        "[dagster] data ...",
        "[dagster] train test_efficientnet|0 ...",
        "[dagster] train test_efficientnet|1 ...",
        "[dagster] evaluate+serve ...",
    ]
    assert any(line.startswith("[dagster] served model: none -> v0001") for line in lines)
    assert len(lines) < 30, "\n".join(lines)  # 9 [dagster] lines; the event stream was ~250 lines here
    home = no_dagster_home / demo.DEFAULT_HOME
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 4 and {run.status.value for run in runs} == {"SUCCESS"}
        assert sum(len(instance.all_logs(run.run_id)) for run in runs) > 100  # the UI still has every event
