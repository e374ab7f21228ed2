"""raw_events / rejected_events: every bad-input kind, reconciliation, idempotence, atomicity."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest
from helpers import check_results, materialize_pipeline, pipeline_resources, query, write_lines

from assets.ingestion.raw_events import (
    check_raw_keys_not_null,
    check_reconciliation,
    check_rejected_provenance,
    check_rejected_share,
    ingest,
)
from resources.event_sources import InputFile, get_format
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse

GOOD = "u1,2026-01-05 10:00:00,search,i1"
CANONICAL_BAD_INPUT = [
    (1, "user_id,event_time,event_name,item_id", "header"),
    (2, GOOD, None),
    (3, "", "blank_line"),
    (4, GOOD + "\r", "duplicate"),  # CRLF ending: same row as line 2
    (5, ",2026-01-05 10:00:00,search,i1", "missing_user_id"),
    (6, "u2,,search,i1", "missing_event_time"),
    (7, "u2,not a time,search,i1", "malformed_event_time"),
    (8, "u2,1970-01-01 00:00:00,search,i1", "event_time_out_of_range"),
    (9, "u2,2999-01-01 00:00:00,search,i1", "event_time_out_of_range"),
    (10, "u2,2026-01-05 10:00:00,,i1", "missing_event_name"),
    (11, "u2,2026-01-05 10:00:00,search", "wrong_column_count"),
    (12, "u2,2026-01-05 10:00:00,search,i1,extra", "wrong_column_count"),
    (13, "u\x01x,2026-01-05 10:00:00,search,i1", "malformed_user_id"),
    (14, "u2,2026-01-05 10:00:00,se\x07arch,i1", "malformed_event_name"),
    (15, '"u3,2026-01-05 10:00:00,search,i1', "malformed_quoting"),
    (16, "u3,INVALID_UTF8,search,i1", "invalid_utf8"),
    (17, "u3,2026-01-05 10:00:00,search,i2", None),
    (18, "u3,2026-01-05 11:00:00,checkout", "truncated_row"),  # last line, no newline
]


def bad_input_file(tmp_path):
    body = "\n".join(line for _, line, _ in CANONICAL_BAD_INPUT).encode()
    body = body.replace(b"INVALID_UTF8", b"\xff\xfe time")
    path = tmp_path / "events" / "bad.csv"
    path.parent.mkdir()
    path.write_bytes(body)
    return path


def test_every_bad_input_kind_is_quarantined_with_its_reason(home, tmp_path):
    path = bad_input_file(tmp_path)
    result = materialize_pipeline(pipeline_resources(home, path, "canonical"))
    assert result.success and all(check_results(result).values())

    rejected = query(home, "SELECT source_row, reason, raw FROM rejected_events ORDER BY source_row")
    expected = {row: reason for row, _, reason in CANONICAL_BAD_INPUT if reason not in (None, "header")}
    assert dict(zip(rejected.source_row, rejected.reason)) == expected
    raw_by_row = dict(zip(rejected.source_row, rejected.raw))
    assert raw_by_row[12] == "u2,2026-01-05 10:00:00,search,i1,extra"  # the row's own text
    assert raw_by_row[16] == "u3,\\xFF\\xFE time,search,i1"  # undecodable bytes, escaped

    accepted = query(home, "SELECT source_row, user_id, event_time, source_file FROM raw_events")
    assert sorted(accepted.source_row) == [2, 17]
    assert set(accepted.source_file) == {str(path.resolve())}
    log = query(home, "SELECT rows_read, rows_accepted, rows_rejected FROM ingested_files")
    assert log.values.tolist() == [[17, 2, 15]]  # 18 lines minus the header


def test_taobao_preset_rejects_ids_names_and_implausible_times(home, tmp_path):
    path = write_lines(
        tmp_path / "UserBehavior.csv",
        [
            "1,2268318,2520377,pv,1511544070",
            "abc,2268318,2520377,pv,1511544070",  # malformed user id (ids are integers)
            "1,2268318,2520377,click,1511544070",  # not a Taobao behaviour
            "1,2268318,2520377,pv,0",  # 1970: corrupt
            "1,2268318,2520377,pv,1511544070000",  # milliseconds: far future
            "1,2268318,2520377,buy,1505088000",
        ],  # 2017-09-11: a real outlier, accepted
    )
    result = materialize_pipeline(pipeline_resources(home, path, "taobao"), sessionize=False)
    assert result.success
    reasons = query(home, "SELECT source_row, reason FROM rejected_events ORDER BY 1")
    assert reasons.values.tolist() == [
        [2, "malformed_user_id"],
        [3, "unknown_event_name"],
        [4, "event_time_out_of_range"],
        [5, "event_time_out_of_range"],
    ]
    assert sorted(query(home, "SELECT source_row FROM raw_events").source_row) == [1, 6]


def test_min_event_time_quarantines_dataset_noise_on_request(home, tmp_path):
    path = write_lines(
        tmp_path / "UserBehavior.csv",
        ["1,2268318,2520377,pv,1511544070", "1,2268318,2520377,buy,1505088000"],
    )
    run_config = {"ops": {"ingested_events": {"config": {"min_event_time": "2017-11-25T00:00:00+08:00"}}}}
    materialize_pipeline(pipeline_resources(home, path, "taobao"), run_config, sessionize=False)
    assert query(home, "SELECT source_row, reason FROM rejected_events").values.tolist() == [
        [2, "event_time_out_of_range"]
    ]


def test_parquet_input_with_typed_columns_nulls_and_duplicates(home, tmp_path):
    frame = pd.DataFrame(
        {
            "user_id": [7, 7, None, 8],
            "event_time": pd.to_datetime(["2026-01-05 10:00", "2026-01-05 10:00", "2026-01-05 11:00", None], utc=True),
            "event_name": ["home", "home", "home", "search"],
            "device": pd.Categorical(["app", "app", "web", "web"]),
        }
    )
    path = tmp_path / "events.parquet"
    frame.to_parquet(path)
    result = materialize_pipeline(pipeline_resources(home, path, "canonical"))
    assert result.success
    accepted = query(home, "SELECT user_id, event_time, device, source_row FROM raw_events")
    assert accepted.values.tolist() == [["7", pd.Timestamp("2026-01-05 10:00"), "app", 1]]
    rejected = query(home, "SELECT source_row, reason, raw FROM rejected_events ORDER BY 1")
    assert rejected[["source_row", "reason"]].values.tolist() == [
        [2, "duplicate"],
        [3, "missing_user_id"],
        [4, "missing_event_time"],
    ]
    assert '"device":"web"' in rejected.raw.iloc[1]  # parquet rows keep their values as JSON


def table_state(home):
    return (
        query(home, "SELECT * FROM raw_events ORDER BY source_file, source_row"),
        query(home, "SELECT * FROM rejected_events ORDER BY source_file, source_row"),
        query(home, "SELECT * FROM ingested_files ORDER BY source_file"),
        sorted(p.name for p in (home / "parquet").rglob("*.parquet")),
    )


def test_reingestion_is_idempotent_and_new_files_are_added_once(home, tmp_path):
    folder = tmp_path / "events"
    header = "user_id,event_time,event_name"
    write_lines(folder / "a.csv", [header, "u1,2026-01-05 10:00:00,home", "u1,2026-01-05 10:05:00,search"])
    resources = pipeline_resources(home, folder, "canonical")
    materialize_pipeline(resources, sessionize=False)
    before = table_state(home)

    rerun = materialize_pipeline(resources, sessionize=False)
    after = table_state(home)
    for old, new in zip(before[:3], after[:3]):
        pd.testing.assert_frame_equal(old, new)
    assert before[3] == after[3]  # not a single new parquet file
    metadata = rerun.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["files_already_ingested"].value == 1 and metadata["rows_added"].value == 0

    # A new file: its rows once; a row identical to one of a.csv is a duplicate, not a 2nd copy.
    write_lines(folder / "b.csv", [header, "u2,2026-01-05 12:00:00,home", "u1,2026-01-05 10:00:00,home"])
    materialize_pipeline(resources, sessionize=False)
    materialize_pipeline(resources, sessionize=False)
    raw = query(home, "SELECT user_id, source_file FROM raw_events")
    assert len(raw) == 3 and (raw.source_file.str.endswith("b.csv")).sum() == 1
    assert query(home, "SELECT source_row, reason FROM rejected_events").values.tolist() == [[3, "duplicate"]]
    assert len(query(home, "SELECT * FROM ingested_files")) == 2

    # A grown file (new content at the same path) is read again: old rows are duplicates.
    write_lines(
        folder / "a.csv",
        [header, "u1,2026-01-05 10:00:00,home", "u1,2026-01-05 10:05:00,search", "u1,2026-01-05 10:07:00,buy"],
    )
    result = materialize_pipeline(resources, sessionize=False)
    assert all(check_results(result).values())
    assert len(query(home, "SELECT * FROM raw_events")) == 4
    assert query(home, "SELECT count(*) AS n FROM rejected_events WHERE reason = 'duplicate'").n[0] == 3


def test_a_run_that_fails_midway_leaves_the_previous_tables(home, tmp_path, monkeypatch):
    folder = tmp_path / "events"
    header = "user_id,event_time,event_name"
    write_lines(folder / "a.csv", [header, "u1,2026-01-05 10:00:00,home"])
    warehouse = DuckDBWarehouse(paths=TraceDagsterPaths(home=str(home)))
    inputs = lambda: [InputFile(p, "csv", get_format("canonical")) for p in sorted(folder.glob("*.csv"))]  # noqa: E731
    with warehouse.connect() as con:
        ingest(warehouse, con, inputs())
    before = table_state(home)

    write_lines(folder / "b.csv", [header, "u2,2026-01-05 10:00:00,home"])
    calls = []
    original = DuckDBWarehouse.register_parquet

    def crash_on_second_table(self, con, table, files, replace):
        calls.append(table)
        original(self, con, table, files, replace)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between two statements of the swap")

    monkeypatch.setattr(DuckDBWarehouse, "register_parquet", crash_on_second_table)
    with warehouse.connect() as con, pytest.raises(KeyboardInterrupt):
        ingest(warehouse, con, inputs())
    monkeypatch.undo()
    after = table_state(home)
    for old, new in zip(before[:3], after[:3]):
        pd.testing.assert_frame_equal(old, new)
    assert len(after[3]) == len(before[3]) + 2  # the parts written, but never referenced

    with warehouse.connect() as con:
        summary = ingest(warehouse, con, inputs())
    assert summary.new_files == [str((folder / "b.csv").resolve())]
    assert len(query(home, "SELECT * FROM raw_events")) == 2
    assert len(table_state(home)[3]) == len(before[3]) + 2  # orphans swept, new parts kept


def test_blocking_check_stops_sessionization_when_too_much_is_rejected(home, tmp_path):
    path = bad_input_file(tmp_path)
    result = materialize_pipeline(
        pipeline_resources(home, path, "canonical"), max_rejected_share=0.5, raise_on_error=False
    )
    assert not result.success
    assert check_results(result)["raw_events:rejected_share_below_threshold"] is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "sessionized_events" not in materialized


@pytest.fixture
def check_con():
    """Tables shaped like the warehouse's, small enough to break on purpose."""
    con = duckdb.connect()
    con.execute("""
        CREATE TABLE ingested_files AS SELECT * FROM (VALUES
            ('a.csv', 'h', 1, 1, 'canonical', 3, 2, 1, TIMESTAMP '2026-01-01 00:00:00', 'r1'))
            t(source_file, content_hash, size_bytes, mtime_ns, events_format, rows_read,
              rows_accepted, rows_rejected, ingested_at, run_id);
        CREATE TABLE raw_events AS SELECT * FROM (VALUES
            ('u1', TIMESTAMP '2026-01-05 10:00:00', 'home', 'a.csv', 2, TIMESTAMP '2026-01-01 00:00:00'),
            ('u1', TIMESTAMP '2026-01-05 10:01:00', 'home', 'a.csv', 3, TIMESTAMP '2026-01-01 00:00:00'))
            t(user_id, event_time, event_name, source_file, source_row, ingested_at);
        CREATE TABLE rejected_events AS SELECT * FROM (VALUES
            ('a.csv', 4, 'x,y', 'wrong_column_count', TIMESTAMP '2026-01-01 00:00:00'))
            t(source_file, source_row, raw, reason, ingested_at);
    """)
    yield con
    con.close()


def test_checks_pass_on_consistent_tables(check_con):
    assert check_reconciliation(check_con).passed
    assert check_rejected_share(check_con, 0.5).passed
    assert check_raw_keys_not_null(check_con).passed
    assert check_rejected_provenance(check_con).passed


def test_reconciliation_fails_when_a_row_is_lost(check_con):
    check_con.execute("DELETE FROM rejected_events")
    result = check_reconciliation(check_con)
    assert not result.passed and "a.csv" in result.metadata["mismatches"].value


def test_rejected_share_fails_above_threshold(check_con):
    result = check_rejected_share(check_con, 0.2)  # 1 of 3 rejected
    assert not result.passed and result.metadata["rejected_share"].value == pytest.approx(1 / 3)


def test_null_keys_and_missing_provenance_fail(check_con):
    check_con.execute("UPDATE raw_events SET event_name = NULL WHERE source_row = 3")
    check_con.execute("UPDATE rejected_events SET reason = NULL")
    assert not check_raw_keys_not_null(check_con).passed
    assert not check_rejected_provenance(check_con).passed


def test_definitions_load_and_every_warehouse_step_is_in_the_pool(home, monkeypatch):
    """DuckDB has one writer per file: the instance the CLI makes runs the pool one at a time."""
    import dagster as dg

    from resources.warehouse import WAREHOUSE_POOL
    from trace_dagster.cli import prepare_instance
    from trace_dagster.definitions import defs

    job = defs.resolve_job_def("full_pipeline")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} >= {
        "raw_events",
        "rejected_events",
        "sessionized_events",
    }
    ours = ("ingested_events", "ingestion_checks", "sessionized_events", "sessionization_checks")
    pools = {node.name: node.definition.pool for node in job.graph.nodes if node.name in ours}
    assert pools == dict.fromkeys(ours, WAREHOUSE_POOL)

    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # restored after the test
    dagster_home = prepare_instance(home)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
