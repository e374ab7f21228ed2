"""The retraining schedule: weekly by default, one run per tick (the tick time is the run key)."""

import dagster as dg

from trace_dagster.jobs import retrain_models

RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00 UTC


@dg.schedule(
    job=retrain_models,
    cron_schedule=RETRAIN_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekly retraining of every model, with gated promotion.",
)
def weekly_retraining(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    tick = context.scheduled_execution_time.isoformat()
    return dg.RunRequest(
        run_key=f"weekly-retraining-{tick}", tags={"trace_dagster/trigger": "schedule", "trace_dagster/tick": tick}
    )


SCHEDULES = [weekly_retraining]
