"""A sensor that refreshes the data when the source folder's content changes.

The cursor is ``melanoma_ml.pipeline.source_fingerprint`` of the configured data: ``data.source_dir``,
``data.image_dir`` and every ``data.external_sources`` entry (metadata file bytes + image listings). A new
fingerprint starts ``prepare_data``; training and everything after it follow by declarative automation.
The built-in synthetic demo set never changes, so with no source folder the sensor skips.
"""

import dagster as dg

from melanoma_assets.jobs import TRIGGER_TAG, prepare_data_job
from melanoma_assets.resources import PipelineSettings
from melanoma_ml.pipeline import source_fingerprint

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


automation_sensor = dg.AutomationConditionSensorDefinition(
    "melanoma_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates the assets' eager automation conditions: after the data refresh, training, "
    "evaluation, promotion and the gallery follow. Nothing fires until source_metadata is materialized.",
)
