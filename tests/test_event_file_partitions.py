"""Event files as `event_files` dynamic partitions of `raw_events` / `rejected_events`.

A partition run reads exactly its file; re-running a grown file's partition reads only the
appended rows; a range (what a single-run backfill launches) equals the files ingested one by one;
a vanished file's partition fails with a clear message; the `new_event_files` sensor registers
files as partitions and targets them once per file state, and removes (once) the partition of a
file it saw that was deleted, leaving its rows in the warehouse; `trace-dagster run` registers
today's files and targets their range.
"""

from pathlib import Path

import dagster as dg
import pytest
from helpers import pipeline_resources, query, write_lines

from assets.ingestion.partitions import EVENT_FILES, RANGE_END_TAG, RANGE_START_TAG, covering_range
from assets.ingestion.raw_events import ingested_events, ingestion_checks
from resources.event_sources import EventSource, events_root, partition_key_for
from resources.paths import TraceDagsterPaths

HEADER = "user_id,event_time,event_name,device"


def day_rows(day: int, n: int, start: int = 0) -> list[str]:
    return [f"u{i % 3},2026-01-0{day} 10:{i:02d}:00,pv,{'app' if i % 2 else 'web'}" for i in range(start, start + n)]


@pytest.fixture
def drop(tmp_path) -> Path:
    """Three daily files; day2 repeats a row of day1 (a `duplicate`), day3 holds a bad row."""
    folder = tmp_path / "drop"
    write_lines(folder / "day1.csv", [HEADER, *day_rows(5, 4)])
    write_lines(folder / "nested" / "day2.csv", [HEADER, day_rows(5, 1)[0], *day_rows(6, 3)])
    write_lines(folder / "day3.csv", [HEADER, *day_rows(7, 2), "u9,not a time,pv,app"])
    return folder


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def run_partitions(instance, resources, *keys: str, raise_on_error: bool = True):
    """Ingestion with its checks on one `event_files` key, or on the range first..last of `keys`."""
    registered = instance.get_dynamic_partitions(EVENT_FILES.name)
    instance.add_dynamic_partitions(EVENT_FILES.name, [k for k in keys if k not in registered])
    tags = {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]} if len(keys) > 1 else {}
    return dg.materialize(
        [ingested_events, ingestion_checks],
        resources=resources,
        instance=instance,
        partition_key=keys[0] if len(keys) == 1 else None,
        tags=tags,
        run_config={"ops": {"ingestion_checks": {"config": {"max_rejected_share": 1.0}}}},
        raise_on_error=raise_on_error,
    )


def partition_metadata(result, asset: str = "raw_events") -> dict[str, dict]:
    return {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node("ingested_events")
        if m.asset_key.to_user_string() == asset
    }


KEYS = ["day1.csv", "day3.csv", "nested/day2.csv"]  # relative to the folder, in list (path) order


def test_keys_are_paths_relative_to_the_events_root(drop, home):
    source = EventSource(paths=TraceDagsterPaths(home=str(home)), events=str(drop))
    assert [source.file_key(item.path) for item in source.list_inputs()[0]] == KEYS
    assert events_root(str(drop / "**" / "*.csv")) == drop.resolve()
    assert events_root(str(drop / "day1.csv")) == drop.resolve()
    assert partition_key_for(drop / "a...b.csv", drop.resolve()) == "a..%2Eb.csv"  # `...` is Dagster's range mark
    simulator = EventSource(paths=TraceDagsterPaths(home=str(home)))
    assert simulator.file_key(simulator.paths.simulated_dir / "x.parquet") == "x.parquet"
    assert simulator.simulated_file_name().startswith("simulated_events_n_users=2000_")


def test_covering_range_spans_the_wanted_keys_in_partition_order():
    assert covering_range(["a", "b", "c"], ["c", "b"]) == ([], {RANGE_START_TAG: "b", RANGE_END_TAG: "c"})
    assert covering_range(["a", "b"], ["z", "a"]) == (["z"], {RANGE_START_TAG: "a", RANGE_END_TAG: "z"})
    assert covering_range([], ["x"]) == (["x"], {"dagster/partition": "x"})
    assert covering_range(["a"], []) == ([], {})


def test_a_partition_run_ingests_only_its_file_and_a_rerun_reads_only_appended_rows(drop, home, instance):
    resources = pipeline_resources(home, drop, "canonical")
    first = run_partitions(instance, resources, "nested/day2.csv")
    assert first.success
    files = query(home, "SELECT DISTINCT source_file FROM raw_events").source_file.tolist()
    assert files == [str((drop / "nested" / "day2.csv").resolve())]
    meta = partition_metadata(first)
    assert list(meta) == ["nested/day2.csv"]
    assert (meta["nested/day2.csv"]["read"], meta["nested/day2.csv"]["rows_read"]) == ("new", 4)
    assert meta["nested/day2.csv"]["dagster/row_count"] == 4

    path = drop / "nested" / "day2.csv"
    with path.open("a") as handle:  # the file grows: same key, only the new rows are read
        handle.write("\n".join(day_rows(8, 5)) + "\n")
    grown = run_partitions(instance, resources, "nested/day2.csv")
    meta = partition_metadata(grown)["nested/day2.csv"]
    assert (meta["read"], meta["from_row"], meta["rows_read"], meta["rows_accepted"]) == ("appended", 6, 5, 5)
    assert meta["dagster/row_count"] == 9
    rejected_meta = partition_metadata(grown, "rejected_events")["nested/day2.csv"]
    assert (rejected_meta["rows_rejected"], rejected_meta["dagster/row_count"]) == (0, 0)
    assert len(query(home, "SELECT * FROM raw_events")) == 9

    again = run_partitions(instance, resources, "nested/day2.csv")  # unchanged: nothing read
    assert partition_metadata(again)["nested/day2.csv"]["read"] == "unchanged"
    assert len(query(home, "SELECT * FROM raw_events")) == 9
    # The UI's per-partition view: both tables materialized for this key, three times.
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("raw_events"), asset_partitions=["nested/day2.csv"]), limit=10
    ).records
    assert len(records) == 3


def tables(home: Path):
    raw = query(home, "SELECT * EXCLUDE (ingested_at) FROM raw_events ORDER BY source_file, source_row")
    rejected = query(home, "SELECT * EXCLUDE (ingested_at) FROM rejected_events ORDER BY source_file, source_row")
    return raw, rejected


def test_a_range_in_one_run_equals_the_files_one_by_one(drop, tmp_path):
    one_run, one_by_one = tmp_path / "one_run", tmp_path / "one_by_one"
    with dg.instance_for_test() as instance:
        result = run_partitions(instance, pipeline_resources(one_run, drop, "canonical"), *KEYS)
        assert result.success
        meta = partition_metadata(result)
        assert sorted(meta) == sorted(KEYS)
        assert {k: m["rows_read"] for k, m in meta.items()} == {"day1.csv": 4, "day3.csv": 3, "nested/day2.csv": 4}
    with dg.instance_for_test() as instance:
        for key in KEYS:
            assert run_partitions(instance, pipeline_resources(one_by_one, drop, "canonical"), key).success
    raw, rejected = tables(one_run)
    raw_single, rejected_single = tables(one_by_one)
    assert raw.equals(raw_single) and rejected.equals(rejected_single)
    assert sorted(rejected.reason) == ["duplicate", "malformed_event_time"]
    assert len(raw) + len(rejected) == 11  # every row read lands in one table


def test_a_vanished_file_fails_its_partition_clearly_and_is_skipped_in_a_range(drop, home, instance):
    resources = pipeline_resources(home, drop, "canonical")
    instance.add_dynamic_partitions(EVENT_FILES.name, ["gone.csv"])
    failed = run_partitions(instance, resources, "gone.csv", raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "no input file for partition(s) gone.csv" in message and "moved or deleted" in message
    # A range over it and a real file: the real one is ingested, the vanished one said so.
    instance.add_dynamic_partitions(EVENT_FILES.name, ["day1.csv"])
    mixed = run_partitions(instance, resources, "gone.csv", "day1.csv")
    assert mixed.success
    meta = partition_metadata(mixed)
    assert meta["gone.csv"]["read"] == "missing" and meta["day1.csv"]["rows_read"] == 4


def test_only_files_narrows_a_range_and_says_so_per_partition(drop, home, instance):
    resources = pipeline_resources(home, drop, "canonical")
    instance.add_dynamic_partitions(EVENT_FILES.name, KEYS)
    result = dg.materialize(
        [ingested_events],
        resources=resources,
        instance=instance,
        tags={RANGE_START_TAG: KEYS[0], RANGE_END_TAG: KEYS[-1]},
        run_config={"ops": {"ingested_events": {"config": {"only_files": ["day3.csv"]}}}},
    )
    meta = partition_metadata(result)
    assert {k: m["read"] for k, m in meta.items()} == {
        "day1.csv": "not_selected",
        "day3.csv": "new",
        "nested/day2.csv": "not_selected",
    }
    assert query(home, "SELECT count(*) AS n FROM raw_events").n[0] == 2


def test_a_run_without_partition_still_ingests_every_file(drop, home, instance):
    """What a bare `materialize()` or a launch without a partition does: every input file."""
    result = dg.materialize([ingested_events], resources=pipeline_resources(home, drop, "canonical"), instance=instance)
    assert result.success
    assert len(query(home, "SELECT DISTINCT source_file FROM raw_events")) == 3


# ------------------------------------------------------------------------------------------------
# Who adds the partitions: the sensor and `trace-dagster run`


def tick(instance, cursor, resources):
    from trace_dagster.definitions import defs
    from trace_dagster.sensors import new_event_files

    with dg.build_sensor_context(
        instance=instance, instance_ref=instance.get_ref(), cursor=cursor, resources=resources, definitions=defs
    ) as context:
        return new_event_files.evaluate_tick(context)


def apply_partition_requests(instance, data) -> None:
    """What the daemon does with a tick's asset events and dynamic_partitions_requests (in that order)."""
    for event in data.asset_events or []:
        instance.report_runless_asset_event(event)
    for request in data.dynamic_partitions_requests or []:
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                if instance.has_dynamic_partition(request.partitions_def_name, key):
                    instance.delete_dynamic_partition(request.partitions_def_name, key)
        else:
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)


def deletes(data) -> list[list[str]]:
    return [
        list(r.partition_keys)
        for r in data.dynamic_partitions_requests or []
        if isinstance(r, dg.DeleteDynamicPartitionsRequest)
    ]


@pytest.fixture
def persistent_instance(tmp_path):
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        yield instance


def test_sensor_adds_partitions_and_requests_each_file_state_once(drop, home, persistent_instance):
    instance = persistent_instance
    resources = {"event_source": EventSource(paths=TraceDagsterPaths(home=str(home)), events=str(drop))}
    first = tick(instance, None, resources)
    (add,) = first.dynamic_partitions_requests
    assert (add.partitions_def_name, sorted(add.partition_keys)) == ("event_files", sorted(KEYS))
    (request,) = first.run_requests
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == ("day1.csv", "nested/day2.csv")
    apply_partition_requests(instance, first)

    again = tick(instance, first.cursor, resources)  # same states: nothing to add, nothing to run
    assert not again.run_requests and not again.dynamic_partitions_requests

    with (drop / "day3.csv").open("a") as handle:
        handle.write("\n".join(day_rows(9, 2)) + "\n")
    grown = tick(instance, again.cursor, resources)
    (request,) = grown.run_requests
    assert request.partition_key == "day3.csv" and not grown.dynamic_partitions_requests
    assert request.run_key != first.run_requests[0].run_key
    assert tick(instance, first.cursor, resources).run_requests[0].run_key == request.run_key  # same state, same key
    assert not tick(instance, grown.cursor, resources).run_requests

    write_lines(drop / "day4.csv", [HEADER, *day_rows(9, 1)])
    arrived = tick(instance, grown.cursor, resources)
    assert [r.partition_key for r in arrived.run_requests] == ["day4.csv"]
    assert [list(r.partition_keys) for r in arrived.dynamic_partitions_requests] == [["day4.csv"]]


def test_sensor_registers_the_simulator_file_without_running(home, persistent_instance):
    resources = {"event_source": EventSource(paths=TraceDagsterPaths(home=str(home)), simulator_n_users=50)}
    data = tick(persistent_instance, None, resources)
    assert not data.run_requests and "simulator" in data.skip_message
    (add,) = data.dynamic_partitions_requests
    assert list(add.partition_keys) == [resources["event_source"].simulated_file_name()]
    assert not (home / "simulated").exists() or not any((home / "simulated").iterdir())  # nothing generated
    apply_partition_requests(persistent_instance, data)
    assert not tick(persistent_instance, None, resources).dynamic_partitions_requests


def test_sensor_on_the_simulator_removes_no_partition(drop, home, persistent_instance):
    """The simulator's key has no file until a run generates it, and the simulator lists no folder:
    neither its key nor the keys of a folder used before (whose files are gone) are removed."""
    instance = persistent_instance
    folder = {"event_source": EventSource(paths=TraceDagsterPaths(home=str(home)), events=str(drop))}
    first = tick(instance, None, folder)
    apply_partition_requests(instance, first)
    simulator = {"event_source": EventSource(paths=TraceDagsterPaths(home=str(home)), simulator_n_users=50)}
    key = simulator["event_source"].simulated_file_name()
    instance.add_dynamic_partitions(EVENT_FILES.name, [key])
    for path in drop.rglob("*.csv"):
        path.unlink()
    data = tick(instance, first.cursor, simulator)
    assert not deletes(data) and not data.asset_events
    assert not (home / "simulated").exists() or not any((home / "simulated").iterdir())
    assert sorted(instance.get_dynamic_partitions(EVENT_FILES.name)) == sorted([*KEYS, key])


def test_sensor_removes_the_partition_of_a_deleted_file_once_and_keeps_its_rows(drop, home, persistent_instance):
    instance = persistent_instance
    resources = {"event_source": EventSource(paths=TraceDagsterPaths(home=str(home)), events=str(drop))}
    first = tick(instance, None, resources)
    apply_partition_requests(instance, first)
    assert not deletes(first)
    assert run_partitions(instance, pipeline_resources(home, drop, "canonical"), *KEYS).success
    day3 = str((drop / "day3.csv").resolve())
    count = "SELECT count(*) AS n FROM {} WHERE source_file = '" + day3 + "'"
    rows = (query(home, count.format("raw_events")).n[0], query(home, count.format("rejected_events")).n[0])
    assert rows == (2, 1)

    (drop / "day3.csv").unlink()
    gone = tick(instance, first.cursor, resources)
    assert not gone.run_requests and "1 deleted file(s) unregistered" in gone.skip_message
    assert deletes(gone) == [["day3.csv"]]  # only the deleted file: the live ones keep theirs
    (observation,) = gone.asset_events
    assert (observation.asset_key, observation.partition) == (dg.AssetKey("raw_events"), "day3.csv")
    assert observation.metadata["source_file"].value == day3
    apply_partition_requests(instance, gone)
    assert instance.get_dynamic_partitions(EVENT_FILES.name) == ["day1.csv", "nested/day2.csv"]
    # A source file's deletion is not a retraction: its rows and its ledger entry stay.
    assert (query(home, count.format("raw_events")).n[0], query(home, count.format("rejected_events")).n[0]) == rows
    assert query(home, count.format("ingested_files")).n[0] == 1

    # Once: the next tick (new cursor) and a re-evaluation of the same tick (old cursor, the key
    # already removed) request nothing more.
    again = tick(instance, gone.cursor, resources)
    assert not again.run_requests and not again.dynamic_partitions_requests and not again.asset_events
    replay = tick(instance, first.cursor, resources)
    assert not deletes(replay) and not replay.asset_events

    # A deletion and an arrival in one tick: one run for the new file, the other partition removed.
    (drop / "nested" / "day2.csv").unlink()
    write_lines(drop / "day4.csv", [HEADER, *day_rows(9, 1)])
    mixed = tick(instance, again.cursor, resources)
    assert [r.partition_key for r in mixed.run_requests] == ["day4.csv"]
    assert deletes(mixed) == [["nested/day2.csv"]]
    apply_partition_requests(instance, mixed)
    assert instance.get_dynamic_partitions(EVENT_FILES.name) == ["day1.csv", "day4.csv"]

    # The file comes back: a new file again, registered and ingested (the ledger decides what to read).
    write_lines(drop / "day3.csv", [HEADER, *day_rows(7, 2), "u9,not a time,pv,app"])
    back = tick(instance, mixed.cursor, resources)
    assert [r.partition_key for r in back.run_requests] == ["day3.csv"]
    assert [list(r.partition_keys) for r in back.dynamic_partitions_requests] == [["day3.csv"]]


def test_sensor_removes_nothing_when_the_events_root_is_empty_missing_or_narrowed(drop, home, persistent_instance):
    """An emptied or missing root (an unmounted volume looks like that) is a skip, not a wipe; a file
    left out of a narrowed events spec still exists, so it is not a deleted file."""
    instance = persistent_instance
    resources = {"event_source": EventSource(paths=TraceDagsterPaths(home=str(home)), events=str(drop))}
    first = tick(instance, None, resources)
    apply_partition_requests(instance, first)

    one_file = {"event_source": EventSource(paths=TraceDagsterPaths(home=str(home)), events=str(drop / "day1.csv"))}
    narrowed = tick(instance, first.cursor, one_file)  # same root (drop), two files no longer listed
    assert not deletes(narrowed) and not narrowed.asset_events

    moved = drop.parent / "elsewhere"
    drop.rename(moved)
    missing = tick(instance, first.cursor, resources)
    assert not missing.dynamic_partitions_requests and "no such file or folder" in missing.skip_message
    drop.mkdir()
    empty = tick(instance, first.cursor, resources)
    assert not empty.dynamic_partitions_requests and "no CSV or parquet file" in empty.skip_message
    assert instance.get_dynamic_partitions(EVENT_FILES.name) == KEYS


def test_cli_registers_todays_files_and_targets_their_range(drop, home, monkeypatch, persistent_instance):
    from trace_dagster.cli import event_file_partitions

    monkeypatch.setenv("TRACE_DAGSTER_HOME", str(home))
    monkeypatch.setenv("TRACE_DAGSTER_EVENTS", str(drop))
    keys, tags = event_file_partitions(persistent_instance, {})
    assert keys == KEYS and persistent_instance.get_dynamic_partitions("event_files") == KEYS
    assert tags == {RANGE_START_TAG: "day1.csv", RANGE_END_TAG: "nested/day2.csv"}
    monkeypatch.setenv("TRACE_DAGSTER_EVENTS", str(drop / "missing"))  # the run reports it: no tags
    assert event_file_partitions(persistent_instance, {}) == ([], {})
    monkeypatch.delenv("TRACE_DAGSTER_EVENTS")
    config = {"resources": {"event_source": {"config": {"simulator_n_users": 300}}}}
    keys, tags = event_file_partitions(persistent_instance, config)
    assert keys == [EventSource(paths=TraceDagsterPaths(), simulator_n_users=300).simulated_file_name()]
    assert tags == {"dagster/partition": keys[0]}
