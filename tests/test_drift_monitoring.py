"""The drift step on a real (small) simulated pipeline: quiet on unchanged data, loud on a real shift.

1. After the pipeline, the drift step is run twice on unchanged data: no signal fires, and the
   two checks compare exactly the same populations (like with like, deterministic samples).
2. Then 30% of one event name is turned into another for every user's events of the current
   window (a planted change): the gated input-drift check fails with a reason naming the moved
   features, and `retrain_on_drift` would launch `retrain_models`.
"""

from __future__ import annotations

import json

import dagster as dg
import pytest

from tests.helpers import failed_steps, materialize_full_graph, small_run_config
from trace_dagster.sensors import DRIFT_CHECK, retrain_on_drift

pytestmark = pytest.mark.slow

N_USERS = 300
DRIFT_CHECKS = ("drift_report:drift_below_threshold", "drift_report:model_outputs_stable")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    home = tmp_path_factory.mktemp("drift_monitoring") / "trace_home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRACE_DAGSTER_HOME", str(home))
        for name in ("TRACE_DAGSTER_EVENTS", "TRACE_DAGSTER_EVENTS_FORMAT", "MLFLOW_TRACKING_URI"):
            env.delenv(name, raising=False)
        (home.parent / "dagster_home").mkdir()
        with dg.instance_for_test(temp_dir=str(home.parent / "dagster_home")) as instance:
            run = materialize_full_graph(
                home,
                small_run_config(sequence_epochs=1, conversion_epochs=1, bootstrap_samples=20),
                instance=instance,
                simulator_n_users=N_USERS,
                simulator_days=35,
            )
            assert run.result.success, failed_steps(run.result)
            yield run


def check_drift(pipeline) -> dict[str, dg.AssetCheckEvaluation]:
    """The drift step and its two checks, as `ingest_and_monitor` ends, into the pipeline's instance."""
    from assets.monitoring.assets import drift_below_threshold, drift_report, model_outputs_stable

    result = dg.materialize(
        [drift_report, drift_below_threshold, model_outputs_stable],
        resources=pipeline.resources,
        instance=pipeline.instance,
        raise_on_error=False,
    )
    assert result.success, failed_steps(result)
    return {f"drift_report:{e.check_name}": e for e in result.get_asset_check_evaluations()}


def latest_rows(pipeline, n: int):
    return pipeline.query(f"SELECT * FROM drift_report ORDER BY checked_at DESC LIMIT {n}")


def test_unchanged_data_twice_fires_nothing_and_compares_equal_populations(pipeline):
    first, second = check_drift(pipeline), check_drift(pipeline)
    for evaluations in (first, second):
        assert set(evaluations) == set(DRIFT_CHECKS)
        for name, evaluation in evaluations.items():
            assert evaluation.passed, (name, evaluation.metadata["reason"].value)
    a, b = latest_rows(pipeline, 2).to_dict("records")
    for column in (
        "drift_share",
        "reference_sessions",
        "current_sessions",
        "reference_users",
        "current_users",
        "embedding_drift_score",
        "prediction_drift_share",
    ):
        assert a[column] == b[column], column
    timeless = [{k: v for k, v in s.items() if k != "report_path"} for s in json.loads(a["segments"])]
    assert timeless == [{k: v for k, v in s.items() if k != "report_path"} for s in json.loads(b["segments"])]
    assert a["current_end"] - a["reference_cutoff"] == a["reference_cutoff"] - a["reference_start"]


def test_planted_shift_fails_the_gated_check_and_would_retrain(pipeline):
    from resources.warehouse import DuckDBWarehouse

    row = latest_rows(pipeline, 1).iloc[0]
    names = pipeline.query(
        "SELECT event_name, count(*) n FROM sessionized_events GROUP BY 1 ORDER BY n DESC, 1 LIMIT 2"
    )["event_name"].tolist()
    source, target = names
    # 30% of `source` turned into `target`, for every user, in the window the champion has not seen.
    warehouse: DuckDBWarehouse = pipeline.resources["warehouse"]
    with warehouse.connect() as con:
        warehouse.replace_table(
            con,
            "sessionized_events",
            f"""SELECT * REPLACE (
                CASE WHEN event_name = '{source}' AND event_time >= TIMESTAMP '{row["reference_cutoff"]}'
                      AND ('0x' || md5(user_id || ':' || event_index)[1:8])::UBIGINT % 100 < 30
                     THEN '{target}' ELSE event_name END AS event_name)
                FROM sessionized_events""",
        )

    evaluations = check_drift(pipeline)
    gated = evaluations["drift_report:drift_below_threshold"]
    assert not gated.passed
    reason = gated.metadata["reason"].value
    assert "input drift in all" in reason and f"share_{source}" in reason, reason
    assert gated.metadata["report_url"].value.startswith("file://")
    segments = json.loads(latest_rows(pipeline, 1).iloc[0]["segments"])
    assert next(s for s in segments if s["segment"] == "all")["dataset_drift"]

    history = pipeline.instance.event_log_storage.get_asset_check_execution_history(DRIFT_CHECK, limit=50)
    with dg.build_sensor_context(instance=pipeline.instance, cursor=str(min(r.id for r in history) - 1)) as context:
        data = retrain_on_drift.evaluate_tick(context)
    assert len(data.run_requests) == 1, data.skip_message
    assert data.run_requests[0].tags["trace_dagster/drift_check_run"] == history[0].run_id
