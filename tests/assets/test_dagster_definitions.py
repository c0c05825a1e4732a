"""The definitions load fast, validate with the Dagster CLI, and follow the profile's backbone x fold grid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from melanoma_assets.definitions import build_definitions
from melanoma_assets.partitions import TrainingGrid
from melanoma_ml.config import load_config

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "lightning", "pytorch_grad_cam", "gradio")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MELANOMA_", "DAGSTER_HOME"))}
    env.update({"DAGSTER_HOME": str(tmp_path / "dagster_home"), **extra})
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    return env


def test_import_is_fast_and_light(tmp_path: Path) -> None:
    code = (
        "import json, sys, time; t = time.perf_counter(); import melanoma_assets.definitions; "
        f"print(json.dumps([time.perf_counter() - t, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [], f"definitions import pulled in {heavy}"
    assert seconds < 60, (
        f"importing the definitions took {seconds:.1f} s (typically ~1-2 s)"
    )  # pathological only: a busy CI core is slow


@pytest.mark.parametrize("profile", ["tiny", "demo", "full"])
def test_partitions_follow_the_profile(profile: str) -> None:
    config = load_config(profile)
    defs = build_definitions(profile)
    fold_model = defs.resolve_assets_def("fold_model")
    keys = set(fold_model.partitions_def.get_partition_keys())
    assert keys == {f"{b}|{k}" for b in config.backbones for k in range(config.data.n_folds)}
    evaluations = {k for k in defs.resolve_all_asset_keys() if k.path[0] == "evaluation"}
    assert len(evaluations) == len(config.backbones)


def test_each_evaluation_depends_on_exactly_its_backbones_folds() -> None:
    grid = TrainingGrid(("test_efficientnet", "test_resnet"), 3)
    assert grid.keys_for("test_resnet") == ["test_resnet|0", "test_resnet|1", "test_resnet|2"]
    defs = build_definitions("demo")
    graph = defs.resolve_asset_graph()
    evaluation = dg.AssetKey(["evaluation", "test_resnet"])
    assert graph.get(evaluation).parent_keys == {dg.AssetKey("fold_model")}


JOB_ASSETS = {
    "prepare_data": {"source_metadata", "clean_metadata", "quarantined_rows", "patient_folds", "image_cache"},
    "train_models": {"fold_model"},
    "evaluate_and_promote": {
        "evaluation/test_efficientnet",
        "test_evaluation",
        "tabular_baseline",
        "leaderboard",
        "serving_model",
        "gradcam_gallery",
    },
    "serving_monitor_job": {"serving_monitor"},
}
"""Each job of the ``tiny`` profile and the assets it materializes."""


@pytest.mark.parametrize(("job_name", "assets"), sorted(JOB_ASSETS.items()))
def test_each_job_resolves_with_its_asset_selection(job_name: str, assets: set[str]) -> None:
    job = build_definitions("tiny").resolve_job_def(job_name)
    assert job.name == job_name
    assert {key.to_user_string() for key in job.asset_layer.selected_asset_keys} == assets
    if job_name == "train_models":  # the only partitioned job: one run per backbone x fold
        assert set(job.partitions_def.get_partition_keys()) == {"test_efficientnet|0", "test_efficientnet|1"}
    elif job_name == "serving_monitor_job":  # one run per UTC day of the prediction log
        assert isinstance(job.partitions_def, dg.DailyPartitionsDefinition)
    else:
        assert job.partitions_def is None


def test_the_jobs_are_exactly_ours() -> None:
    names = {job.name for job in build_definitions("tiny").resolve_all_job_defs()}
    assert {n for n in names if not n.startswith("__")} == set(JOB_ASSETS)


def test_graph_has_checks_schedule_sensor_and_training_pool() -> None:
    defs = build_definitions("tiny")
    check_names = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert {
        "clean_metadata_schema",
        "folds_leak_free_and_balanced",
        "checkpoint_loads",
        "report_complete",
        "served_bundle_reproduces",
    } <= check_names
    assert defs.resolve_schedule_def("weekly_retrain").cron_schedule
    assert defs.resolve_sensor_def("source_data_changed")
    automation = defs.resolve_sensor_def("melanoma_automation")
    assert automation.default_status == dg.DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("source_metadata")).automation_condition is None  # refreshed by job/sensor
    for key in (
        "clean_metadata",
        "patient_folds",
        "image_cache",
        "fold_model",
        "tabular_baseline",
        "leaderboard",
        "serving_model",
    ):
        assert graph.get(dg.AssetKey(key)).automation_condition is not None, key
    assert graph.get(dg.AssetKey("source_metadata")).code_version
    assert defs.resolve_assets_def("fold_model").op.pool == "training"


def test_instance_template_turns_telemetry_off_and_limits_training_to_one_slot() -> None:
    import yaml

    instance = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert instance["telemetry"] == {"enabled": False}
    assert instance["concurrency"]["pools"]["default_limit"] == 1
    assert instance["storage"]["sqlite"]["base_dir"].startswith(".dagster_home")


@pytest.mark.slow
def test_dagster_cli_validates_the_workspace_with_the_instance_template(tmp_path: Path) -> None:
    dagster = Path(sys.executable).with_name("dagster")
    env = clean_env(tmp_path, MELANOMA_PROFILE="tiny")
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster_home" / "dagster.yaml")
    out = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=tmp_path,  # the template's relative .dagster_home paths resolve here, not in the repo
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All code locations passed validation" in out.stdout + out.stderr
    assert (tmp_path / ".dagster_home" / "storage").is_dir()
