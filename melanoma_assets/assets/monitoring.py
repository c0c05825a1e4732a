"""The serving monitor: one partition per UTC day of the prediction log, compared with the served bundle.

``serving_monitor`` runs ``melanoma_ml.monitoring.monitor.monitor_logged_day`` for its day and shows every
number as float metadata (the UI plots each over the partitions: Asset -> Plots), the day as a markdown
table, and one asset check per kind of shift (``monitor.CHECKS``) that WARNs, never blocks, past the
``monitoring`` settings. The ``serving_monitor_daily`` schedule materializes yesterday's partition at
00:30 UTC. It sits downstream of ``serving_model`` and outside the retraining run, like ``batch_scores``.
"""

import os

import dagster as dg

from melanoma_assets.groups import MONITORING
from melanoma_assets.resources import PipelineSettings
from melanoma_assets.versions import code_version
from melanoma_ml.monitoring.monitor import CHECKS, MonitorReport, monitor_logged_day

START_ENV = "MELANOMA_MONITOR_START"
DEFAULT_START = "2026-01-01"

daily_partitions = dg.DailyPartitionsDefinition(start_date=os.environ.get(START_ENV) or DEFAULT_START)
"""One partition per UTC day of the prediction log, from ``MELANOMA_MONITOR_START`` (default 2026-01-01)."""

CHECK_DESCRIPTIONS = {
    "score_shift": "Served probabilities vs the bundle's out-of-fold rows: PSI and KS (monitoring.score_psi_warn).",
    "metadata_shift": "Sex, anatomic-site and age-band mix vs the bundle's reference (monitoring.metadata_psi_warn).",
    "ood_rate": "Share of out-of-distribution flags vs the detector's expected share (monitoring.ood_rate_excess_warn).",
    "positive_rate": "Share of positive decisions vs the reference at serving.deployment_prevalence "
    "(monitoring.positive_rate_difference_warn).",
    "estimated_performance": "AUC and sensitivity estimated before labels (CBPE) vs the reference "
    "(monitoring.estimated_auc_drop_warn, estimated_sensitivity_drop_warn).",
}


@dg.asset(
    group_name=MONITORING,
    partitions_def=daily_partitions,
    deps=["serving_model"],
    code_version=code_version("serving_monitor"),
    check_specs=[
        dg.AssetCheckSpec(name, asset="serving_monitor", description=CHECK_DESCRIPTIONS[name])
        for name in CHECKS
    ],
    description="One UTC day of the prediction log against the served bundle's reference: volume, OOD-flag "
    "rate, score and metadata shift, positive-decision rate, CBPE estimates of AUC and sensitivity.",
)
def serving_monitor(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
    report = monitor_logged_day(settings.config(), context.partition_key)
    if report is None:
        note = "no model has been served yet: nothing to monitor"
        checks = [
            dg.AssetCheckResult(check_name=name, passed=True, metadata={"note": note}) for name in CHECKS
        ]
        return dg.MaterializeResult(metadata={"note": note}, check_results=checks)
    return dg.MaterializeResult(metadata=report_metadata(report), check_results=check_results(report))


def report_metadata(report: MonitorReport) -> dict[str, object]:
    """Each number as float metadata (plotted over the days), the version and the day as markdown."""
    numbers = {name: dg.MetadataValue.float(value) for name, value in report.metrics().items()}
    return {
        **numbers,
        "model_version": report.model_version or "none",
        "report": dg.MetadataValue.md(report.markdown()),
    }


def check_results(report: MonitorReport) -> list[dg.AssetCheckResult]:
    """One WARN-severity result per check: failed when the day crossed one of its thresholds."""
    results = []
    for name in CHECKS:
        crossed = report.warnings_for(name)
        text = "\n".join(f"- {w.message}" for w in crossed) or (
            "within its thresholds" if report.judged else "too few cases to judge"
        )
        results.append(
            dg.AssetCheckResult(
                check_name=name,
                passed=not crossed,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"cases": report.n_cases, "details": dg.MetadataValue.md(text)},
            )
        )
    return results


serving_monitor_job = dg.define_asset_job(
    "serving_monitor_job",
    selection=dg.AssetSelection.assets(serving_monitor),
    partitions_def=daily_partitions,
    description="Monitor one UTC day of the prediction log.",
)

serving_monitor_schedule = dg.build_schedule_from_partitioned_job(
    serving_monitor_job,
    name="serving_monitor_daily",
    hour_of_day=0,
    minute_of_hour=30,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="At 00:30 UTC, monitor yesterday's prediction log (the day just closed).",
)
