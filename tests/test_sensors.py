"""The two sensors, evaluated tick by tick as the daemon would, against a persistent test instance.

- `new_event_files`: one run of `ingest_and_monitor` per set of new or changed event files.
- `retrain_on_drift`: one run of `retrain_models` per failed `drift_report:drift_below_threshold`
  check, read from genuine check records: a stand-in `drift_report` asset with a check of the same
  key is materialized into the instance, so the sensor reads what a real run would have written.
"""

import os
from pathlib import Path

import dagster as dg
import pytest

from resources.event_sources import EventSource
from resources.paths import TraceDagsterPaths
from trace_dagster.sensors import DRIFT_CHECK, new_event_files, retrain_on_drift

HEADER = "user_id,event_time,event_name,item_id,category,device"


def persistent_instance(dagster_home: Path):
    """A persistent instance (SQLite under `dagster_home`), as the daemon's; an ephemeral one is refused."""
    dagster_home.mkdir()
    return dg.instance_for_test(temp_dir=str(dagster_home))


@pytest.fixture
def instance(tmp_path):
    """A fresh instance per test: the drift tests count check records."""
    with persistent_instance(tmp_path / "dagster_home") as instance:
        yield instance


@pytest.fixture(scope="module")
def file_sensor_instance(tmp_path_factory):
    """One instance for the file-sensor tests, which keep their state in the cursor they pass."""
    with persistent_instance(tmp_path_factory.mktemp("file_sensor") / "dagster_home") as instance:
        yield instance


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None, resources: dict | None = None):
    """One evaluation, as the daemon runs it: run requests or a skip message, and the new cursor.

    The code location's definitions are passed as the daemon does: partitioned run requests
    (`new_event_files` targets `event_files` partitions) are resolved against the job.
    """
    from trace_dagster.definitions import defs

    with dg.build_sensor_context(
        instance=instance, instance_ref=instance.get_ref(), cursor=cursor, resources=resources, definitions=defs
    ) as context:
        return sensor.evaluate_tick(context)


def only_request(data, job_name: str) -> dg.RunRequest:
    assert data.skip_message is None
    assert len(data.run_requests) == 1, data.run_requests
    request = data.run_requests[0]
    assert request.job_name in (None, job_name)  # None: the sensor's own (single) job
    assert request.run_key
    return request


def assert_skipped(data) -> str:
    assert not data.run_requests
    assert data.skip_message
    return data.skip_message


# ------------------------------------------------------------------------------------------------
# new_event_files


def write_events(path: Path, n_rows: int) -> Path:
    rows = [f"u{i % 3},2026-01-05 10:{i:02d}:00,pv,item{i},cat{i % 2},mobile" for i in range(n_rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


@pytest.fixture
def drop_folder(tmp_path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    return folder


def event_source_resources(home: Path, events: str = "") -> dict:
    """The sensor's resource; `events` empty means $TRACE_DAGSTER_EVENTS, as in definitions.py."""
    return {"event_source": EventSource(paths=TraceDagsterPaths(home=str(home)), events=events)}


@pytest.mark.parametrize("configured_by", ["env", "resource"])
def test_new_files_start_one_ingestion_each_time(file_sensor_instance, drop_folder, home, monkeypatch, configured_by):
    if configured_by == "env":
        monkeypatch.setenv("TRACE_DAGSTER_EVENTS", str(drop_folder))
        resources = event_source_resources(home)
    else:
        resources = event_source_resources(home, events=str(drop_folder))
    assert new_event_files.job_name == "ingest_and_monitor"
    write_events(drop_folder / "day1.csv", 5)
    write_events(drop_folder / "day2.csv", 7)

    first = tick(new_event_files, file_sensor_instance, None, resources)
    first_request = only_request(first, "ingest_and_monitor")
    assert first_request.tags["trace_dagster/new_files"] == "2"
    assert first.cursor

    again = tick(new_event_files, file_sensor_instance, first.cursor, resources)
    assert "no new files" in assert_skipped(again)

    write_events(drop_folder / "day3.csv", 4)
    third = tick(new_event_files, file_sensor_instance, again.cursor, resources)
    third_request = only_request(third, "ingest_and_monitor")
    assert third_request.tags["trace_dagster/new_files"] == "1"
    assert third_request.run_key != first_request.run_key
    assert_skipped(tick(new_event_files, file_sensor_instance, third.cursor, resources))


def test_changed_file_counts_as_new(file_sensor_instance, drop_folder, home, monkeypatch):
    monkeypatch.setenv("TRACE_DAGSTER_EVENTS", str(drop_folder))
    resources = event_source_resources(home)
    day1 = write_events(drop_folder / "day1.csv", 5)
    write_events(drop_folder / "day2.csv", 7)
    first = tick(new_event_files, file_sensor_instance, None, resources)
    keys = {only_request(first, "ingest_and_monitor").run_key}

    write_events(day1, 9)  # new content: size and mtime change
    rewritten = tick(new_event_files, file_sensor_instance, first.cursor, resources)
    request = only_request(rewritten, "ingest_and_monitor")
    assert request.tags["trace_dagster/new_files"] == "0" and request.tags["trace_dagster/changed_files"] == "1"
    keys.add(request.run_key)

    stat = day1.stat()
    os.utime(day1, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: same size, new mtime
    touched = tick(new_event_files, file_sensor_instance, rewritten.cursor, resources)
    keys.add(only_request(touched, "ingest_and_monitor").run_key)
    assert len(keys) == 3  # three triggers, three distinct run keys
    assert_skipped(tick(new_event_files, file_sensor_instance, touched.cursor, resources))


def test_files_that_are_not_events_do_not_trigger(file_sensor_instance, drop_folder, home, monkeypatch):
    monkeypatch.setenv("TRACE_DAGSTER_EVENTS", str(drop_folder))
    resources = event_source_resources(home)
    write_events(drop_folder / "day1.csv", 5)
    first = tick(new_event_files, file_sensor_instance, None, resources)
    only_request(first, "ingest_and_monitor")
    (drop_folder / "README.md").write_text("what these files are\n")
    (drop_folder / ".day2.csv.partial").write_text(HEADER + "\n")  # a copy in progress (hidden)
    skipped = tick(new_event_files, file_sensor_instance, first.cursor, resources)
    assert "no new files among 1" in assert_skipped(skipped)


def test_empty_drop_folder_skips_with_a_reason_until_files_arrive(file_sensor_instance, drop_folder, home, monkeypatch):
    monkeypatch.setenv("TRACE_DAGSTER_EVENTS", str(drop_folder))
    resources = event_source_resources(home)
    empty = tick(new_event_files, file_sensor_instance, None, resources)
    assert "no CSV or parquet file" in assert_skipped(empty)
    write_events(drop_folder / "day1.csv", 5)
    only_request(tick(new_event_files, file_sensor_instance, empty.cursor, resources), "ingest_and_monitor")


def test_simulator_has_no_new_files(file_sensor_instance, home):
    assert "TRACE_DAGSTER_EVENTS" not in os.environ  # conftest unsets it
    data = tick(new_event_files, file_sensor_instance, None, event_source_resources(home))
    assert "simulator" in assert_skipped(data)
    assert not (home / "simulated").exists()  # skipping generated nothing


# ------------------------------------------------------------------------------------------------
# retrain_on_drift


class StandInDriftConfig(dg.Config):
    drifted: bool = False
    fail: bool = False  # the asset fails before its check can run (e.g. no champion yet)


@dg.asset(name="drift_report", required_resource_keys={"during_run"})
def stand_in_drift_report(context: dg.AssetExecutionContext, config: StandInDriftConfig) -> dg.MaterializeResult:
    """Same key as the real asset; records whether "traffic drifted", as the real one does."""
    if config.fail:
        raise dg.Failure("stand-in drift_report failed")
    context.resources.during_run(context.instance)
    return dg.MaterializeResult(metadata={"dataset_drift": config.drifted})


@dg.asset_check(asset=stand_in_drift_report, name="drift_below_threshold")
def stand_in_drift_below_threshold(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Same key as the real check; like it, reads the latest report and fails on drift."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey("drift_report"))
    drifted = event.asset_materialization.metadata["dataset_drift"].value
    return dg.AssetCheckResult(passed=not drifted, metadata={"dataset_drift": drifted})


def check_drift(
    instance: dg.DagsterInstance, drifted: bool = False, fail: bool = False, during_run=lambda instance: None
) -> dg.ExecuteInProcessResult:
    """Materialize the stand-in drift report and its check into `instance`: one genuine check record."""
    result = dg.materialize(
        [stand_in_drift_report, stand_in_drift_below_threshold],
        instance=instance,
        resources={"during_run": during_run},
        run_config={"ops": {"drift_report": {"config": {"drifted": drifted, "fail": fail}}}},
        raise_on_error=False,
    )
    assert result.success != fail
    if not fail:
        [evaluation] = result.get_asset_check_evaluations()
        assert evaluation.asset_check_key == DRIFT_CHECK and evaluation.passed != drifted
    return result


def test_stand_in_check_has_the_key_the_sensor_watches(instance):
    result = check_drift(instance, drifted=True)
    [record] = instance.event_log_storage.get_asset_check_execution_history(DRIFT_CHECK, limit=10)
    assert record.status.value == "FAILED"
    assert record.run_id == result.run_id


def test_no_check_result_yet_skips(instance):
    assert "no new completed" in assert_skipped(tick(retrain_on_drift, instance, None))


def test_failed_drift_check_starts_one_retraining(instance):
    assert retrain_on_drift.job_name == "retrain_models"
    check_drift(instance, drifted=False)
    passed = tick(retrain_on_drift, instance, None)
    assert "none failed" in assert_skipped(passed)

    failed_run = check_drift(instance, drifted=True)
    first = tick(retrain_on_drift, instance, passed.cursor)
    first_request = only_request(first, "retrain_models")
    assert first_request.tags["trace_dagster/drift_check_run"] == failed_run.run_id

    assert_skipped(tick(retrain_on_drift, instance, first.cursor))  # same state: nothing twice
    # A daemon that lost the tick's cursor asks again: same run key, so Dagster launches it once.
    replayed = tick(retrain_on_drift, instance, passed.cursor)
    assert only_request(replayed, "retrain_models").run_key == first_request.run_key

    check_drift(instance, drifted=False)
    recovered = tick(retrain_on_drift, instance, first.cursor)
    assert "none failed" in assert_skipped(recovered)

    later_run = check_drift(instance, drifted=True)
    later = tick(retrain_on_drift, instance, recovered.cursor)
    later_request = only_request(later, "retrain_models")
    assert later_request.run_key != first_request.run_key
    assert later_request.tags["trace_dagster/drift_check_run"] == later_run.run_id


def test_several_failures_between_ticks_start_one_retraining(instance):
    check_drift(instance, drifted=True)
    latest = check_drift(instance, drifted=True)
    data = tick(retrain_on_drift, instance, None)
    assert only_request(data, "retrain_models").tags["trace_dagster/drift_check_run"] == latest.run_id


def test_failure_followed_by_a_pass_still_retrains(instance):
    """The drift was seen once: a later pass before the tick does not erase it."""
    failed = check_drift(instance, drifted=True)
    check_drift(instance, drifted=False)
    data = tick(retrain_on_drift, instance, None)
    assert only_request(data, "retrain_models").tags["trace_dagster/drift_check_run"] == failed.run_id


def test_run_that_failed_before_its_check_does_not_block_later_failures(instance):
    """A failed run leaves its check record PLANNED for ever; the sensor must step over it."""
    check_drift(instance, fail=True)
    [planned] = instance.event_log_storage.get_asset_check_execution_history(DRIFT_CHECK, limit=10)
    assert planned.status.value == "PLANNED"
    assert_skipped(tick(retrain_on_drift, instance, None))  # not a drift: no retraining

    failed = check_drift(instance, drifted=True)
    data = tick(retrain_on_drift, instance, None)
    assert only_request(data, "retrain_models").tags["trace_dagster/drift_check_run"] == failed.run_id


def test_cursor_waits_for_a_check_still_running(instance):
    """Records are numbered when planned: a slow run's check may complete after a newer one did.

    While run A is in its drift_report step (its check record PLANNED), run B's check fails. The
    tick then must neither move its cursor past A nor lose B: once A's check has passed, B's
    failure still starts a retraining.
    """
    seen_during_run = {}

    def during_run_a(instance):
        seen_during_run["b"] = check_drift(instance, drifted=True)  # run B, inside run A's step
        seen_during_run["tick"] = tick(retrain_on_drift, instance, None)

    run_a = check_drift(instance, drifted=False, during_run=during_run_a)
    records = instance.event_log_storage.get_asset_check_execution_history(DRIFT_CHECK, limit=10)
    assert [r.run_id for r in sorted(records, key=lambda r: r.id)] == [run_a.run_id, seen_during_run["b"].run_id]

    during = seen_during_run["tick"]
    assert "no new completed" in assert_skipped(during)
    assert during.cursor is None  # not moved past the running check

    after = tick(retrain_on_drift, instance, during.cursor)
    assert only_request(after, "retrain_models").tags["trace_dagster/drift_check_run"] == seen_during_run["b"].run_id


def test_a_growing_file_starts_one_ingestion_per_change(file_sensor_instance, drop_folder, home):
    resources = event_source_resources(home, events=str(drop_folder))
    log = write_events(drop_folder / "today.csv", 5)
    first = only_request(tick(new_event_files, file_sensor_instance, None, resources), "ingest_and_monitor")
    cursor = tick(new_event_files, file_sensor_instance, None, resources).cursor

    keys = [first.run_key]
    for extra in (3, 4):  # the collector appends twice
        with log.open("a") as handle:
            handle.write("".join(f"u9,2026-01-06 11:{i:02d}:00,pv,item{i},cat0,mobile\n" for i in range(extra)))
        grown = tick(new_event_files, file_sensor_instance, cursor, resources)
        request = only_request(grown, "ingest_and_monitor")
        assert request.tags["trace_dagster/changed_files"] == "1" and request.tags["trace_dagster/new_files"] == "0"
        # The same state seen from the same cursor again (a restarted daemon) asks for the same key.
        assert only_request(
            tick(new_event_files, file_sensor_instance, cursor, resources), "ingest_and_monitor"
        ).run_key == (request.run_key)
        assert "no new files" in assert_skipped(tick(new_event_files, file_sensor_instance, grown.cursor, resources))
        keys.append(request.run_key)
        cursor = grown.cursor
    assert len(set(keys)) == 3  # one run per change, none repeated


def test_drift_right_after_training_on_the_same_data_does_not_retrain_again(instance):
    """A failure in a run that has just trained (e.g. `retrain_models`) would retrain in a loop:
    the shift lies where examples only have labels, so the sensor waits for new data instead."""
    job = dg.define_asset_job("retrain_models", selection=[stand_in_drift_report])
    definitions = dg.Definitions(
        assets=[stand_in_drift_report],
        asset_checks=[stand_in_drift_below_threshold],
        jobs=[job],
        resources={"during_run": lambda instance: None},
    )
    run = definitions.resolve_job_def("retrain_models").execute_in_process(
        instance=instance, run_config={"ops": {"drift_report": {"config": {"drifted": True}}}}, raise_on_error=False
    )
    [record] = instance.event_log_storage.get_asset_check_execution_history(DRIFT_CHECK, limit=10)
    assert record.status.value == "FAILED" and record.run_id == run.run_id
    assert "waiting for new events" in assert_skipped(tick(retrain_on_drift, instance, None))

    failed = check_drift(instance, drifted=True)  # e.g. ingest_and_monitor after new files
    data = tick(retrain_on_drift, instance, None)
    assert only_request(data, "retrain_models").tags["trace_dagster/drift_check_run"] == failed.run_id
