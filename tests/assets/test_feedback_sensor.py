"""labelled_cases_arrived: a retraining run once enough new labelled cases with kept images came back."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from outcome_helpers import log_cases

from melanoma_assets.jobs import TRIGGER_TAG
from melanoma_assets.resources import ArtifactStorage, DataSource, PipelineSettings, TrainingHardware
from melanoma_assets.sensors import FEEDBACK_CASES_TAG, labelled_cases_arrived
from melanoma_ml.errors import InputValueError
from melanoma_ml.monitoring.deployed import retraining_due
from melanoma_ml.monitoring.outcomes import record_outcome

NEED = 4


def settings_for(root: Path, **overrides) -> PipelineSettings:
    return PipelineSettings(
        profile="tiny",
        overrides_json=json.dumps({"monitoring": {"retrain_after_labelled_cases": NEED}, **overrides}),
        storage=ArtifactStorage(root=str(root)),
        hardware=TrainingHardware(),
        source=DataSource(),
    )


def label(root: Path, cases: list[str], start: int = 0) -> None:
    for i, case in enumerate(cases, start=start):
        record_outcome(root, case, "melanoma" if i % 2 else "benign", source="cli")


def evaluate(settings: PipelineSettings, cursor: str | None):
    with dg.build_sensor_context(cursor=cursor, resources={"settings": settings}) as context:
        return labelled_cases_arrived(context)


def test_skips_until_enough_new_labelled_cases_then_requests_a_feedback_run(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    settings = settings_for(root)
    nothing = evaluate(settings, None)
    assert isinstance(nothing, dg.SkipReason) and "0 new labelled case" in nothing.skip_message
    assert "serving.keep_images" in nothing.skip_message

    cases = log_cases(root, 10, keep_images=True)
    without_images = log_cases(root, 6, keep_images=False, seed=1)
    label(root, cases[:3] + without_images)  # 3 trainable < NEED; cases without a kept image never count
    few = evaluate(settings, None)
    assert isinstance(few, dg.SkipReason) and "3 new labelled case(s)" in few.skip_message

    label(root, cases[3:5], start=3)
    due = evaluate(settings, None)
    assert isinstance(due, dg.SensorResult)
    [request] = due.run_requests
    assert request.tags[TRIGGER_TAG] == "labelled_cases_arrived" and request.tags[FEEDBACK_CASES_TAG] == "5"
    assert request.run_key == due.cursor
    overrides = json.loads(request.run_config["resources"]["settings"]["config"]["overrides_json"])
    assert overrides["data"]["train_on_feedback"] is True
    assert overrides["monitoring"]["retrain_after_labelled_cases"] == NEED  # the settings' own overrides kept
    [source] = overrides["data"]["feedback_sources"]
    export = Path(source["path"])
    assert export == (root / "monitoring" / "feedback").resolve()
    assert (export / "metadata.csv").read_text().count("\n") == 1 + 5  # header + the 5 trainable cases
    assert oct(export.stat().st_mode & 0o777) == oct(0o700)

    # the run's settings: what every asset of that prepare_data run reads
    run_settings = settings.model_copy(update={"overrides_json": json.dumps(overrides)})
    data = run_settings.config().data
    assert data.train_on_feedback and data.feedback_sources[0].path == str(export)

    assert isinstance(evaluate(settings, due.cursor), dg.SkipReason)  # nothing new since
    label(root, cases[5:8], start=5)
    three_more = evaluate(settings, due.cursor)
    assert isinstance(three_more, dg.SkipReason) and "3 new labelled case(s)" in three_more.skip_message
    label(root, cases[8:], start=8)
    again = evaluate(settings, due.cursor)
    assert isinstance(again, dg.SensorResult) and again.run_requests[0].tags[FEEDBACK_CASES_TAG] == "5"
    assert again.cursor != due.cursor


def test_the_run_config_is_valid_for_the_prepare_data_job(tmp_path: Path) -> None:
    from melanoma_assets.definitions import build_definitions

    root = tmp_path / "artifacts"
    settings = settings_for(root, data={"feedback_sources": [{"path": str(tmp_path / "older_export")}]})
    cases = log_cases(root, NEED, keep_images=True)
    label(root, cases)
    result = evaluate(settings, None)
    [request] = result.run_requests
    overrides = json.loads(request.run_config["resources"]["settings"]["config"]["overrides_json"])
    paths = [s["path"] for s in overrides["data"]["feedback_sources"]]
    assert paths == [str(tmp_path / "older_export"), str((root / "monitoring" / "feedback").resolve())]
    job = build_definitions("tiny").resolve_job_def("prepare_data")
    assert dg.validate_run_config(job, request.run_config)


def test_cursor_counts_cases_recorded_in_the_same_second_once(tmp_path: Path, monkeypatch) -> None:
    from melanoma_ml.config import load_config
    from melanoma_ml.monitoring import outcomes

    root = tmp_path / "artifacts"
    config = load_config(
        "tiny", {"artifact_root": str(root), "monitoring": {"retrain_after_labelled_cases": 2}}
    )
    cases = log_cases(root, 4, keep_images=True)
    monkeypatch.setattr(outcomes, "utc_now", lambda: "2026-12-07T10:00:00Z")
    label(root, cases[:2])
    first = retraining_due(config, None)
    assert first.due and first.new_cases == 2
    label(root, cases[2:3], start=2)  # the same second as the cursor's newest outcome
    second = retraining_due(config, first.cursor)
    assert second.new_cases == 1 and not second.due
    monkeypatch.setattr(outcomes, "utc_now", lambda: "2026-12-07T10:00:01Z")
    label(root, cases[3:], start=3)
    third = retraining_due(config, first.cursor)
    assert third.new_cases == 2 and third.due and third.total_cases == 4
    assert retraining_due(config, third.cursor).new_cases == 0


def test_a_broken_cursor_is_named(tmp_path: Path) -> None:
    from melanoma_ml.config import load_config

    config = load_config("tiny", {"artifact_root": str(tmp_path)})
    with pytest.raises(InputValueError, match="reset the labelled_cases_arrived sensor's cursor"):
        retraining_due(config, "not json")
