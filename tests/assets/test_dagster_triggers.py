"""The data-change sensor (cursor = content hash) and the weekly retraining schedule."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from melanoma_assets.jobs import TRIGGER_TAG
from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware
from melanoma_assets.schedules import CRON_ENV, DEFAULT_CRON, build_retrain_schedule
from melanoma_assets.sensors import FINGERPRINT_TAG, source_data_changed


def settings_for(tmp_path: Path, source_dir: Path | None) -> PipelineSettings:
    return PipelineSettings(
        profile="tiny",
        storage=ArtifactStorage(root=str(tmp_path / "artifacts")),
        hardware=TrainingHardware(),
        source=DataSource(source_dir=str(source_dir) if source_dir else None),
    )


def make_source(folder: Path) -> Path:
    (folder / "jpeg" / "train").mkdir(parents=True)
    (folder / "train.csv").write_text("image_name,patient_id,target\nISIC_1,P1,0\n")
    (folder / "jpeg" / "train" / "ISIC_1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def evaluate(settings: PipelineSettings, cursor: str | None):
    with dg.build_sensor_context(cursor=cursor, resources={"settings": settings}) as context:
        return source_data_changed(context), context


def test_sensor_requests_a_refresh_for_new_data_then_skips_until_it_changes(tmp_path: Path) -> None:
    source = make_source(tmp_path / "isic")
    settings = settings_for(tmp_path, source)

    first, _ = evaluate(settings, cursor=None)
    assert isinstance(first, dg.SensorResult)
    [request] = first.run_requests
    assert first.cursor == request.run_key == request.tags[FINGERPRINT_TAG]
    assert request.tags[TRIGGER_TAG] == "source_data_changed"  # the tag the schedule sets too

    unchanged, _ = evaluate(settings, cursor=first.cursor)
    assert isinstance(unchanged, dg.SkipReason)
    assert "no change" in unchanged.skip_message

    (source / "jpeg" / "train" / "ISIC_2.jpg").write_bytes(b"another image")
    new_image, _ = evaluate(settings, cursor=first.cursor)
    assert isinstance(new_image, dg.SensorResult) and new_image.cursor != first.cursor

    (source / "train.csv").write_text(
        "image_name,patient_id,target\nISIC_1,P1,1\n"
    )  # same size listing, new label
    relabelled, _ = evaluate(settings, cursor=new_image.cursor)
    assert isinstance(relabelled, dg.SensorResult) and relabelled.cursor != new_image.cursor


def test_sensor_skips_for_the_synthetic_demo_set(tmp_path: Path) -> None:
    result, _ = evaluate(settings_for(tmp_path, None), cursor=None)
    assert isinstance(result, dg.SkipReason)
    assert "synthetic" in result.skip_message


def test_sensor_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="data folder not found"):
        evaluate(settings_for(tmp_path, tmp_path / "gone"), cursor=None)


def test_schedule_uses_the_cron_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CRON_ENV, raising=False)
    assert build_retrain_schedule().cron_schedule == DEFAULT_CRON
    monkeypatch.setenv(CRON_ENV, "30 2 * * *")
    schedule = build_retrain_schedule()
    assert schedule.cron_schedule == "30 2 * * *"
    assert schedule.job_name == "prepare_data"


def test_schedule_tick_requests_a_tagged_prepare_data_run() -> None:
    import datetime as dt

    schedule = build_retrain_schedule("0 3 * * 1")
    when = dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.UTC)
    with dg.build_schedule_context(scheduled_execution_time=when) as context:
        request = schedule(context)
    assert isinstance(request, dg.RunRequest)
    assert request.tags[TRIGGER_TAG] == "weekly_retrain"
    assert request.run_key == f"retrain-{when.isoformat()}"
    assert request.run_config == {}


def test_bad_cron_names_the_variable() -> None:
    with pytest.raises(ValueError, match=CRON_ENV):
        build_retrain_schedule("every monday")
