"""``deployed_performance``: each served model version on the clinic's labelled cases, beside its card.

Runs ``melanoma_ml.monitoring.deployed.deployed_performance`` (AUC, sensitivity/specificity at the served
threshold, Brier, ECE, calibration-in-the-large, patient-bootstrap CIs, and the gap to the card's untouched
test numbers) on the outcomes recorded by the end of its partition's UTC day (the serving monitor's daily
partitions): the partition of a day is what was known that day, so the numbers plot over the days (Asset ->
Plots) as outcomes keep coming back. The automation sensor materializes the day just closed at
``DEPLOYED_CRON`` (01:00 UTC); any earlier day can be (re)materialized from the UI. The newest measured
version's numbers are float metadata; every version is in the markdown table.
"""

import os

import dagster as dg

from melanoma_assets.assets.monitoring import DEFAULT_START, START_ENV
from melanoma_assets.groups import MONITORING
from melanoma_assets.resources import PipelineSettings
from melanoma_assets.versions import code_version
from melanoma_ml.monitoring.deployed import DeployedPerformance, deployed_performance

DEPLOYED_CRON = "55 23 * * *"
"""Daily measure (UTC) of the day's partition, as the day ends."""

days_so_far = dg.DailyPartitionsDefinition(
    start_date=os.environ.get(START_ENV) or DEFAULT_START, end_offset=1
)
"""The serving monitor's days (``MELANOMA_MONITOR_START``) and today: "as of now" is a partition too."""


@dg.asset(
    name="deployed_performance",
    group_name=MONITORING,
    partitions_def=days_so_far,
    deps=["serving_model"],
    code_version=code_version("deployed_performance"),
    automation_condition=dg.AutomationCondition.in_latest_time_window()
    & dg.AutomationCondition.cron_tick_passed(DEPLOYED_CRON)
    & ~dg.AutomationCondition.in_progress(),
    description="Each served model version on the clinic's labelled cases (outcomes joined to the prediction "
    "log): AUC, sensitivity/specificity at the served threshold, calibration, patient-bootstrap CIs, and the "
    "gap to its card's test numbers (the optimism gap in production); as of the end of each UTC day.",
)
def deployed_performance_asset(
    context: dg.AssetExecutionContext, settings: PipelineSettings
) -> dg.MaterializeResult:
    result = deployed_performance(settings.config(), as_of=context.partition_key)
    return dg.MaterializeResult(value=result, metadata=performance_metadata(result))


def performance_metadata(result: DeployedPerformance) -> dict[str, object]:
    """Counts, the newest measured version's numbers and gaps as floats, every version as markdown."""
    metadata: dict[str, object] = {
        "labelled_cases": result.n_labelled,
        "versions": len(result.versions),
        "table": dg.MetadataValue.md(result.markdown()),
        "details": dg.MetadataValue.json(result.to_dict()),
    }
    measured = next((v for v in result.versions if v.measured), None)
    if measured is None:
        metadata["measured_version"] = "none"
        return metadata
    metadata["measured_version"] = measured.model_version
    metadata["measured_cases"] = measured.n_cases
    for name, entry in measured.metrics.items():
        metadata[name] = dg.MetadataValue.float(float(entry["value"]))
    for name, gap in measured.gap.items():
        metadata[f"gap_{name}"] = dg.MetadataValue.float(float(gap))
    return metadata
