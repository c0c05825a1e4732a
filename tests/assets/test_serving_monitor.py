"""``serving_monitor``: one day of a prediction log written by ``PredictionLog``, materialized in Dagster.

A registered bundle carries the constructed reference of ``tests/monitor_helpers.py``; a shifted day of
its log makes every asset check WARN (the run still succeeds), and the numbers land as float metadata.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from conftest import TEST_SEED
from monitor_helpers import SHIFTED, append_day, day_of_log, register_served_bundle

from melanoma_assets.assets.monitoring import serving_monitor
from melanoma_assets.definitions import build_definitions
from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware
from melanoma_ml.monitoring.monitor import CHECKS
from melanoma_ml.monitoring.prediction_log import PredictionLog
from melanoma_ml.serving.manifest import BundleManifest

DAY = "2026-12-01"


def settings_for(root: Path) -> PipelineSettings:
    return PipelineSettings(
        profile="tiny",
        overrides_json=json.dumps({}),
        storage=ArtifactStorage(root=str(root)),
        hardware=TrainingHardware(),
        source=DataSource(),
    )


def instance_in(tmp_path: Path):
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    return dg.instance_for_test(temp_dir=str(home))


def write_day(root: Path, manifest: BundleManifest, n: int) -> None:
    log = PredictionLog(root, clock=lambda: datetime(2026, 12, 1, 9, tzinfo=UTC))
    rows = day_of_log(manifest, SHIFTED, n, TEST_SEED, version=manifest.version)
    assert None not in append_day(log, rows)


@pytest.mark.parametrize("n_cases", [100])
def test_a_shifted_day_materializes_with_every_check_warning(tmp_path: Path, n_cases: int) -> None:
    root = tmp_path / "artifacts"
    manifest = register_served_bundle(root, TEST_SEED)
    write_day(root, manifest, n_cases)

    with instance_in(tmp_path) as instance:
        result = dg.materialize(
            [serving_monitor],
            partition_key=DAY,
            resources={"settings": settings_for(root)},
            instance=instance,
        )

    assert result.success  # WARN checks never fail the run
    [event] = result.asset_materializations_for_node("serving_monitor")
    metadata = event.metadata
    assert metadata["model_version"].value == manifest.version and metadata["cases"].value == n_cases
    assert isinstance(metadata["score_psi"], dg.FloatMetadataValue) and metadata["score_psi"].value > 0.2
    assert "| score_psi |" in metadata["report"].value
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == set(CHECKS)
    assert all(not e.passed and e.severity == dg.AssetCheckSeverity.WARN for e in evaluations.values())


def test_a_day_without_a_served_model_passes_with_a_note(tmp_path: Path) -> None:
    with instance_in(tmp_path) as instance:
        result = dg.materialize(
            [serving_monitor],
            partition_key=DAY,
            resources={"settings": settings_for(tmp_path / "artifacts")},
            instance=instance,
        )
    assert result.success
    [event] = result.asset_materializations_for_node("serving_monitor")
    assert "nothing to monitor" in event.metadata["note"].value
    assert all(e.passed for e in result.get_asset_check_evaluations())


def test_the_daily_schedule_monitors_the_day_just_closed() -> None:
    defs = build_definitions("tiny")
    schedule = defs.resolve_schedule_def("serving_monitor_daily")
    assert schedule.cron_schedule == "30 0 * * *" and schedule.job_name == "serving_monitor_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    moment = datetime(2026, 12, 2, 0, 30, tzinfo=UTC)
    with dg.build_schedule_context(scheduled_execution_time=moment) as context:
        [request] = schedule.evaluate_tick(context).run_requests
    assert request.partition_key == DAY
    graph = defs.resolve_asset_graph()
    assert {k.name for k in graph.asset_check_keys if k.asset_key == dg.AssetKey("serving_monitor")} == set(
        CHECKS
    )
