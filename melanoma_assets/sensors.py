"""Sensors: refresh the data when the source folder's content changes; score batches put in the drop folder.

The cursor is ``melanoma_ml.metadata.fingerprint.source_fingerprint`` of the configured data: ``data.source_dir``,
``data.image_dir`` and every ``data.external_sources`` entry (metadata file bytes + image listings). A new
fingerprint starts ``prepare_data``; training and everything after it follow by declarative automation.
The built-in synthetic demo set never changes, so with no source folder the sensor skips.

``incoming_batches`` watches the drop folder (``serving.drop_dir``, default ``<artifact_root>/incoming``):
each new sub-folder, once nothing in it changed for ``QUIET_SECONDS``, becomes a ``batch_scores``
partition named after it, and one run scores it. A folder is scored once; re-materialize its partition to
score it again (e.g. with a newer model).

``labelled_cases_arrived`` retrains on the clinic's own cases: once ``monitoring.retrain_after_labelled_cases``
labelled cases with a kept image (``serving.keep_images``) arrived since the last run it started (cursor: the
newest outcome time it counted, ``monitoring.deployed.retraining_due``), it exports them
(``<artifact_root>/monitoring/feedback``, as ``melanoma-ml outcomes export`` does) and starts ``prepare_data``
with ``data.feedback_sources`` + ``data.train_on_feedback: true`` in the run's settings; training,
evaluation and the promotion gate (which then also compares candidate and champion on those cases) follow.
"""

import json
import time
from pathlib import Path

import dagster as dg

from melanoma_assets.assets.scoring import batch_scores, incoming_batches
from melanoma_assets.jobs import TRIGGER_TAG, prepare_data_job
from melanoma_assets.resources import PipelineSettings
from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.config import deep_merge
from melanoma_ml.metadata.fingerprint import source_fingerprint
from melanoma_ml.monitoring.deployed import retraining_due
from melanoma_ml.monitoring.feedback import export_feedback
from melanoma_ml.serving.batch import drop_folder

FINGERPRINT_TAG = "melanoma/source_fingerprint"


@dg.sensor(
    name="source_data_changed",
    job=prepare_data_job,
    minimum_interval_seconds=300,
    description="Starts prepare_data when the metadata files or the image listing of data.source_dir change.",
)
def source_data_changed(
    context: dg.SensorEvaluationContext, settings: PipelineSettings
) -> dg.SensorResult | dg.SkipReason:
    data = settings.config().data
    source_dir = data.source_dir
    if source_dir is None:
        return dg.SkipReason("data.source_dir is not set: the built-in synthetic demo set does not change")
    # primary, image_dir and external sources; a missing path fails the tick with the setting named
    fingerprint = source_fingerprint(data)
    if fingerprint == context.cursor:
        return dg.SkipReason(f"no change in {source_dir} (fingerprint {fingerprint[:12]})")
    request = dg.RunRequest(
        run_key=fingerprint,
        tags={TRIGGER_TAG: "source_data_changed", FINGERPRINT_TAG: fingerprint},
    )
    return dg.SensorResult(run_requests=[request], cursor=fingerprint)


FEEDBACK_CASES_TAG = "melanoma/new_labelled_cases"
"""Run tag of a retraining run the ``labelled_cases_arrived`` sensor started: how many new labelled cases."""


@dg.sensor(
    name="labelled_cases_arrived",
    job=prepare_data_job,
    minimum_interval_seconds=300,
    description="Starts a retraining run (prepare_data with data.train_on_feedback: true on a fresh export of "
    "the clinic's labelled cases) once monitoring.retrain_after_labelled_cases new labelled cases with a kept "
    "image arrived since the last run it started.",
)
def labelled_cases_arrived(
    context: dg.SensorEvaluationContext, settings: PipelineSettings
) -> dg.SensorResult | dg.SkipReason:
    config = settings.config()
    check = retraining_due(config, context.cursor)
    if not check.due:
        return dg.SkipReason(check.message)
    folder = artifact_paths(config).feedback_export
    export = export_feedback(artifact_paths(config).root, folder)
    context.log.info(export.text())
    request = dg.RunRequest(
        run_key=check.cursor,
        run_config=feedback_run_config(settings, folder),
        tags={TRIGGER_TAG: "labelled_cases_arrived", FEEDBACK_CASES_TAG: str(check.new_cases)},
    )
    return dg.SensorResult(run_requests=[request], cursor=check.cursor)


def feedback_run_config(settings: PipelineSettings, folder: Path) -> dict:
    """Run config of a retraining run on ``folder``: the settings' overrides plus ``data.feedback_sources``
    (the configured ones and ``folder``) and ``data.train_on_feedback: true``; training, evaluation and
    promotion follow by automation on the folds that run makes."""
    config = settings.config()
    sources = [s.model_dump() for s in config.data.feedback_sources]
    if not any(Path(s["path"]).expanduser().resolve() == folder.resolve() for s in sources):
        sources.append({"path": str(folder)})
    overrides = deep_merge(
        settings.overrides(),  # the JSON overrides and the typed fields (artifact root, hardware, source)
        {"data": {"feedback_sources": sources, "train_on_feedback": True}},
    )
    # run config replaces the resource's whole config: the profile and every override travel in it
    return {
        "resources": {
            "settings": {"config": {"profile": settings.profile, "overrides_json": json.dumps(overrides)}}
        }
    }


QUIET_SECONDS = 30.0
"""A drop-folder batch is taken once nothing in it changed for this long (a copy still running is not)."""


@dg.sensor(
    name="incoming_batches",
    target=batch_scores,
    minimum_interval_seconds=30,
    description="Adds a batch_scores partition for each new sub-folder of the drop folder (serving.drop_dir, "
    "default <artifact_root>/incoming) and requests its scoring run.",
)
def incoming_batches_sensor(
    context: dg.SensorEvaluationContext, settings: PipelineSettings
) -> dg.SensorResult | dg.SkipReason:
    folder = drop_folder(settings.config())
    if not folder.is_dir():
        return dg.SkipReason(
            f"drop folder {folder} does not exist: create it (or set serving.drop_dir / "
            "MELANOMA_SERVING__DROP_DIR) and put each batch of images in a sub-folder of it"
        )
    known = set(context.instance.get_dynamic_partitions(incoming_batches.name))
    new, waiting, unusable = [], [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name in known:
            continue
        if "..." in sub.name or not sub.name.isprintable():
            unusable.append(sub.name)  # Dagster refuses such partition keys
        elif time.time() - _last_change(sub) < QUIET_SECONDS:
            waiting.append(sub.name)
        else:
            new.append(sub.name)
    notes = []
    if waiting:
        notes.append(f"still changing (taken {QUIET_SECONDS:g} s after the last change): {waiting}")
    if unusable:
        notes.append(f"names with '...' or control characters, rename them: {unusable}")
    if not new:
        return dg.SkipReason(f"no new batch in {folder}" + "".join(f"; {note}" for note in notes))
    for note in notes:
        context.log.info(note)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=name, partition_key=name) for name in new],
        dynamic_partitions_requests=[incoming_batches.build_add_request(new)],
    )


def _last_change(folder: Path) -> float:
    """Newest mtime of ``folder`` and the entries directly in it (a batch is one flat folder)."""
    return max([folder.stat().st_mtime, *(entry.stat().st_mtime for entry in folder.iterdir())])


automation_sensor = dg.AutomationConditionSensorDefinition(
    "melanoma_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates the assets' eager automation conditions: after the data refresh, training, "
    "evaluation, promotion and the gallery follow. Nothing fires until source_metadata is materialized.",
)
