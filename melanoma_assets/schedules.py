"""Weekly retraining: refresh the data; training, evaluation and promotion follow by automation."""

import os

import dagster as dg

from melanoma_assets.jobs import TRIGGER_TAG, prepare_data_job

CRON_ENV = "MELANOMA_RETRAIN_CRON"
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00
TIMEZONE_ENV = "MELANOMA_RETRAIN_TIMEZONE"


def retrain_cron() -> str:
    """The cron string from ``MELANOMA_RETRAIN_CRON`` (default Mondays 03:00)."""
    return os.environ.get(CRON_ENV) or DEFAULT_CRON


def build_retrain_schedule(cron: str | None = None) -> dg.ScheduleDefinition:
    """The retraining schedule (stopped until switched on in the UI or with ``dagster schedule start``)."""
    cron = cron or retrain_cron()

    def weekly_retrain(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        scheduled = context.scheduled_execution_time
        stamp = scheduled.isoformat() if scheduled else "manual"
        return dg.RunRequest(run_key=f"retrain-{stamp}", tags={TRIGGER_TAG: "weekly_retrain"})

    try:
        return dg.schedule(
            name="weekly_retrain",
            cron_schedule=cron,
            job=prepare_data_job,
            execution_timezone=os.environ.get(TIMEZONE_ENV) or "UTC",
            description=f"Refresh the data ({cron}); training, evaluation and promotion follow by automation.",
        )(weekly_retrain)
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(
            f"{CRON_ENV}={cron!r} is not a valid cron string; use e.g. '0 3 * * 1' (Mondays 03:00). ({exc})"
        ) from exc
