"""One demo command: ``melanoma-ml demo --dagster`` (what ``./dev demo`` runs) hands its settings to Dagster.

The whole-graph materialization itself is tested in test_dagster_graph.py; here only what the command
passes on and what it refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from melanoma_assets import demo
from melanoma_ml import cli
from melanoma_ml.errors import InputValueError

REPO = Path(__file__).resolve().parents[2]


def test_demo_dagster_passes_profile_and_overrides_to_the_dagster_demo(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(
        demo, "materialize_demo", lambda profile, overrides: calls.append((profile, overrides)) or 0
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
