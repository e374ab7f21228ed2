"""The weekly retraining schedule, and the jobs of the code location as Dagster resolves them."""

import itertools
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from helpers import cron_ticks

from trace_dagster.definitions import defs
from trace_dagster.schedules import weekly_retraining

INGESTION_ASSETS = {"raw_events", "rejected_events", "sessionized_events"}
TRAINING_ASSETS = {
    "user_splits",
    "training_examples",
    "funnel_examples",
    "trace_model",
    "myopic_model",
    "vanilla_transformer_model",
    "lstm_model",
    "mtlds_linear_model",
    "evaluation_metrics",
    "model_promotion",
}


def ticks(n: int, after: datetime) -> list[datetime]:
    """The schedule's next `n` tick times after `after`, as the scheduler daemon computes them."""
    return cron_ticks(weekly_retraining.cron_schedule, weekly_retraining.execution_timezone, after, n)


def evaluate(at: datetime) -> dg.RunRequest:
    with dg.build_schedule_context(scheduled_execution_time=at) as context:
        data = weekly_retraining.evaluate_tick(context)
    assert data.skip_message is None
    assert len(data.run_requests) == 1
    return data.run_requests[0]


def test_the_tick_helper_reads_cron():
    """Guard for `cron_ticks` (a test helper, not Dagster's iterator): steps, ranges, days, zones."""
    times = cron_ticks("*/15 9-10 1 * *", "UTC", datetime(2026, 1, 1, tzinfo=UTC), 9)
    assert times[0] == datetime(2026, 1, 1, 9, 0, tzinfo=UTC) and times[-1] == datetime(2026, 2, 1, 9, 0, tzinfo=UTC)
    paris = cron_ticks("0 3 * * 1", "Europe/Paris", datetime(2026, 3, 20, tzinfo=UTC), 2)  # DST on 29 March
    assert [t.astimezone(UTC).hour for t in paris] == [2, 1]


def test_cron_is_weekly_in_utc():
    assert weekly_retraining.execution_timezone == "UTC"
    times = ticks(6, datetime(2026, 3, 1, tzinfo=UTC))  # spans the EU/US DST changes
    assert {b - a for a, b in itertools.pairwise(times)} == {timedelta(days=7)}
    assert {(t.weekday(), t.hour, t.minute) for t in times} == {(0, 3, 0)}  # Mondays 03:00


def test_each_tick_requests_one_retraining_keyed_by_its_time():
    first, second = ticks(2, datetime(2026, 1, 1, tzinfo=UTC))
    request = evaluate(first)
    assert weekly_retraining.job_name == "retrain_models"
    assert request.job_name in (None, "retrain_models")  # None: the schedule's own job
    assert first.isoformat() in request.run_key
    assert request.tags["trace_dagster/tick"] == first.isoformat()
    assert evaluate(first).run_key == request.run_key  # same tick again (daemon restart): one run
    assert evaluate(second).run_key != request.run_key


def test_scheduled_run_config_is_valid_for_the_resolved_job():
    request = evaluate(ticks(1, datetime(2026, 1, 1, tzinfo=UTC))[0])
    job = defs.resolve_job_def(weekly_retraining.job_name)
    config = dg.validate_run_config(job, request.run_config)
    assert "model_promotion" in config["ops"]  # resolved with every asset's default config


def test_a_wrong_run_config_is_rejected():
    """The validation above can fail: an unknown op or a mistyped field is an error."""
    job = defs.resolve_job_def("retrain_models")
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, {"ops": {"model_promotion": {"config": {"margin": "a lot"}}}})
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, {"ops": {"raw_events": {"config": {}}}})  # not in retrain_models


def selected_assets(job_name: str) -> set[str]:
    job = defs.resolve_job_def(job_name)
    return {key.to_user_string() for key in job.asset_layer.selected_asset_keys}


def test_every_job_resolves():
    jobs = {job.name: job for job in defs.resolve_all_job_defs()}
    assert {"full_pipeline", "ingest_and_monitor", "retrain_models", "rollback_champion"} <= set(jobs)
    every_asset = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    reproduction_group = {"reproduction_runs", "ablation_runs", "reproduction_report"}
    assert selected_assets("full_pipeline") == every_asset - reproduction_group  # off the default path
    assert selected_assets("reproduction") | selected_assets("ablations") == reproduction_group
    assert "rollback_registered_model" in {node.name for node in jobs["rollback_champion"].nodes_in_topological_order}


def test_retrain_models_trains_evaluates_promotes_but_does_not_ingest():
    assets = selected_assets("retrain_models")
    assert assets >= TRAINING_ASSETS
    assert {"user_embeddings", "drift_report"} <= assets  # refreshed with the new champion
    assert not assets & INGESTION_ASSETS


def test_ingest_and_monitor_ingests_and_monitors_but_does_not_train():
    assets = selected_assets("ingest_and_monitor")
    assert assets == {*INGESTION_ASSETS, "user_embeddings", "drift_report"}
    assert not assets & TRAINING_ASSETS
    model_assets = {a for a in selected_assets("full_pipeline") if a.endswith("_model")}
    assert model_assets and not assets & model_assets


def test_sensors_and_schedule_target_those_jobs():
    repository = defs.get_repository_def()
    assert repository.get_schedule_def("weekly_retraining").job_name == "retrain_models"
    assert repository.get_sensor_def("new_event_files").job_name == "ingest_and_monitor"
    assert repository.get_sensor_def("retrain_on_drift").job_name == "retrain_models"
