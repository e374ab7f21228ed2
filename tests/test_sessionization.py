"""sessionized_events: exact semantics on a hand-made journey, the pandas reference, the checks."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd
import pytest
from helpers import check_results, materialize_pipeline, pipeline_resources, query, write_lines

import assets.ingestion.sessionized_events as sessionized_events_module
from assets.ingestion.raw_events import ingest
from assets.ingestion.sessionized_events import (
    SESSION_COLUMNS,
    build_sessionized_events,
    check_positions_contiguous,
    check_rows_match_raw_events,
    check_session_keys_not_null,
    user_bucket_sql,
)
from bench.pandas_reference import sessionize_pandas
from resources.event_sources import InputFile, get_format
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse, quote_ident

COMPUTED = [name for name, _ in SESSION_COLUMNS]


@pytest.fixture
def journey(tmp_path):
    return write_lines(
        tmp_path / "journey.csv",
        [
            "user_id,event_time,event_name,device",
            "a,2026-01-05 10:00:00,home,app",
            "a,2026-01-05 12:00:00,search,app",  # gap exactly 7200 s: same session
            "a,2026-01-05 14:00:01,home,web",  # gap 7201 s: a new session
            "a,2026-01-05 14:00:01,buy,web",  # same second: after line 4 (source_row)
            "b,2026-01-04 23:30:00+00:00,home,app",
        ],
    )


def sessionized(home) -> pd.DataFrame:
    return query(home, "SELECT * FROM sessionized_events ORDER BY user_id, event_index")


def test_sessions_positions_and_time_features(home, journey):
    result = materialize_pipeline(pipeline_resources(home, journey, "canonical"))
    assert result.success and all(check_results(result).values())
    frame = sessionized(home)
    a = frame[frame.user_id == "a"]
    assert a.session_id.tolist() == ["a:0", "a:0", "a:1", "a:1"]
    assert a.session_index.tolist() == [0, 0, 1, 1]
    assert a.event_index.tolist() == [0, 1, 2, 3]
    assert a.event_index_in_session.tolist() == [0, 1, 0, 1]
    assert a.event_name.tolist() == ["home", "search", "home", "buy"]
    assert a.seconds_since_prev_event.tolist() == [0, 7200, 7201, 0]
    assert a.seconds_since_session_start.tolist() == [0, 7200, 0, 0]
    assert a.log_seconds_since_prev_event.tolist() == pytest.approx([0, math.log(7201), math.log(7202), 0])
    assert a.hour_of_day.tolist() == [10, 12, 14, 14]
    assert a.day_of_week.tolist() == [0, 0, 0, 0]  # 2026-01-05 is a Monday
    b = frame[frame.user_id == "b"].iloc[0]
    assert (b.session_id, b.day_of_week, b.hour_of_day) == ("b:0", 6, 23)  # Sunday


def test_columns_are_raw_events_columns_plus_the_documented_ones(home, journey):
    materialize_pipeline(pipeline_resources(home, journey, "canonical"))
    raw = query(home, "DESCRIBE raw_events")[["column_name", "column_type"]].values.tolist()
    described = query(home, "DESCRIBE sessionized_events")[["column_name", "column_type"]]
    assert described.values.tolist() == raw + [list(c) for c in SESSION_COLUMNS]


def test_session_gap_is_configurable(home, journey):
    run_config = {"ops": {"sessionized_events": {"config": {"session_gap_seconds": 60}}}}
    materialize_pipeline(pipeline_resources(home, journey, "canonical"), run_config)
    a = sessionized(home).query("user_id == 'a'")
    assert a.session_index.tolist() == [0, 1, 2, 2]


def test_sql_matches_the_pandas_reference_on_simulated_events(home):
    resources = pipeline_resources(home, simulator_n_users=150, simulator_days=14, simulator_seed=5)
    assert materialize_pipeline(resources).success
    sql = sessionized(home)
    raw = query(home, "SELECT * FROM raw_events")
    reference = sessionize_pandas(raw, 7200)
    key = ["source_file", "source_row"]
    merged = sql[key + COMPUTED].merge(reference[key + COMPUTED], on=key, suffixes=("", "_pd"))
    assert len(merged) == len(sql) == len(reference) == len(raw) > 1000
    for column in COMPUTED:
        left, right = merged[column], merged[f"{column}_pd"]
        if left.dtype.kind == "f":
            np.testing.assert_allclose(left, right, rtol=1e-12, atol=1e-9, err_msg=column)
        else:
            assert (left.astype(str) == right.astype(str)).all(), column
    assert sql.groupby("user_id").session_index.max().ge(1).mean() > 0.5  # multi-session users


def test_late_events_land_in_the_right_sessions(home, tmp_path):
    """A later file with events older than ones already sessionized: positions are recomputed."""
    folder = tmp_path / "drop"
    header = "user_id,event_time,event_name"
    write_lines(folder / "day1.csv", [header, "a,2026-01-05 10:00:00,home", "a,2026-01-05 14:00:00,buy"])
    resources = pipeline_resources(home, folder, "canonical")
    assert materialize_pipeline(resources).success
    assert sessionized(home).session_id.tolist() == ["a:0", "a:1"]  # a 4-hour gap: two sessions

    # The collector delivers a late event from between the two: now one session of three events.
    write_lines(folder / "late.csv", [header, "a,2026-01-05 12:00:00,search", "b,2026-01-05 09:00:00,home"])
    result = materialize_pipeline(resources)
    assert result.success and all(check_results(result).values())
    a = sessionized(home).query("user_id == 'a'")
    assert a.event_name.tolist() == ["home", "search", "buy"]
    assert a.session_id.tolist() == ["a:0", "a:0", "a:0"]
    assert a.event_index.tolist() == [0, 1, 2] and a.event_index_in_session.tolist() == [0, 1, 2]
    assert a.seconds_since_prev_event.tolist() == [0, 7200, 7200]


def test_incremental_sessionization_touches_only_buckets_of_users_with_new_events(home, tmp_path):
    folder = tmp_path / "drop"
    header = "user_id,event_time,event_name"
    day1 = [f"u{u},2026-01-05 {8 + e}:{u % 60:02d}:00,home" for u in range(100) for e in range(3)]
    write_lines(folder / "day1.csv", [header, *day1])
    resources = pipeline_resources(home, folder, "canonical")
    first = materialize_pipeline(resources)
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in first.get_asset_materialization_events()}
    assert meta["sessionized_events"]["buckets_rebuilt"].value == 32  # first build: every bucket

    # Two users come back, one of them with a late event: only their buckets are rebuilt.
    write_lines(folder / "day2.csv", [header, "u7,2026-01-05 07:30:00,search", "u42,2026-01-06 09:00:00,buy"])
    second = materialize_pipeline(resources)
    assert second.success and all(check_results(second).values())
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in second.get_asset_materialization_events()}
    assert 1 <= meta["sessionized_events"]["buckets_rebuilt"].value <= 2
    assert meta["sessionized_events"]["rows_rewritten"].value < 100  # of 302 events
    incremental = query(home, "SELECT * FROM sessionized_events ORDER BY source_file, source_row")
    assert incremental.query("user_id == 'u7'").sort_values("event_index").event_name.tolist()[:2] == [
        "search",
        "home",
    ]

    idle = materialize_pipeline(resources)  # nothing new: nothing rebuilt
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in idle.get_asset_materialization_events()}
    assert meta["sessionized_events"]["buckets_rebuilt"].value == 0

    full = {"ops": {"sessionized_events": {"config": {"full_rebuild": True}}}}
    materialize_pipeline(resources, full)
    rebuilt = query(home, "SELECT * FROM sessionized_events ORDER BY source_file, source_row")
    pd.testing.assert_frame_equal(incremental, rebuilt)


def test_no_accepted_event_yet_gives_an_empty_table_then_a_full_one(home, tmp_path):
    folder = tmp_path / "drop"
    header = "user_id,event_time,event_name"
    write_lines(folder / "bad.csv", [header, ",2026-01-05 10:00:00,home"])
    resources = pipeline_resources(home, folder, "canonical")
    assert materialize_pipeline(resources).success
    assert len(sessionized(home)) == 0
    write_lines(folder / "good.csv", [header, "a,2026-01-05 10:00:00,home"])
    result = materialize_pipeline(resources)
    assert result.success and all(check_results(result).values())
    assert sessionized(home).session_id.tolist() == ["a:0"]


def window_sql_oracle(source: str, raw_columns: list[str], session_gap_seconds: float) -> str:
    """The window SQL `sessionized_events` was built with until the streamed sort replaced it
    (two sorts: `lag`, then the running counts), kept as the oracle the new path must equal."""
    return f"""
WITH gaps AS (
    SELECT *,
           row_number() OVER journey - 1 AS event_index_big,
           (epoch_us(event_time) - epoch_us(lag(event_time) OVER journey)) / 1e6 AS gap_seconds
    FROM {source}
    WINDOW journey AS (PARTITION BY user_id ORDER BY event_time, source_file, source_row)
), flagged AS (
    SELECT *, gap_seconds IS NULL OR gap_seconds > {float(session_gap_seconds)} AS starts_session
    FROM gaps
), running AS (
    SELECT *,
           count(*) FILTER (starts_session) OVER so_far - 1 AS session_index_big,
           max(CASE WHEN starts_session THEN event_index_big END) OVER so_far AS start_index,
           max(CASE WHEN starts_session THEN epoch_us(event_time) END) OVER so_far AS start_us
    FROM flagged
    WINDOW so_far AS (PARTITION BY user_id ORDER BY event_index_big
                      ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
SELECT {", ".join(quote_ident(c) for c in raw_columns)},
       user_id || ':' || CAST(session_index_big AS VARCHAR) AS session_id,
       CAST(session_index_big AS INTEGER) AS session_index,
       CAST(event_index_big AS INTEGER) AS event_index,
       CAST(event_index_big - start_index AS INTEGER) AS event_index_in_session,
       coalesce(gap_seconds, 0.0) AS seconds_since_prev_event,
       (epoch_us(event_time) - start_us) / 1e6 AS seconds_since_session_start,
       ln(1 + coalesce(gap_seconds, 0.0)) AS log_seconds_since_prev_event,
       ln(1 + (epoch_us(event_time) - start_us) / 1e6) AS log_seconds_since_session_start,
       CAST(hour(event_time) AS INTEGER) AS hour_of_day,
       CAST(isodow(event_time) - 1 AS INTEGER) AS day_of_week
FROM running
"""


def hard_journeys(seed: int = 7, n_users: int = 200) -> pd.DataFrame:
    """Journeys built to break a sessionizer: one-event users, users with hundreds of sessions,
    gaps of exactly the threshold and one microsecond more or less, runs of events at the same
    microsecond (ties broken by file, then row), times across midnights and weeks, rows shuffled;
    all within ingestion's accepted range (1995 to now)."""
    rng = np.random.default_rng(seed)
    gaps_us = np.array([0, 1, 59_000_000, 7_200_000_000, 7_200_000_001, 7_199_999_999, 86_400_000_000, 10**11])
    rows = []
    for u in range(n_users):
        n = 1 if u % 5 == 0 else int(rng.choice([2, 3, 40, 600]))
        start = int(rng.integers(820_454_400, 1_700_000_000)) * 1_000_000  # 1996-01-01 .. 2023-11
        steps = rng.choice(gaps_us, size=n, p=[0.2, 0.05, 0.25, 0.15, 0.1, 0.05, 0.1, 0.1])
        steps[0] = int(rng.integers(0, 7 * 86_400_000_000))
        for k, t in enumerate(start + np.cumsum(steps)):
            rows.append((f"user-{u:03d}" if u % 7 else f"ü{u}", int(t), f"e{k % 4}", f"item{k}"))
    frame = pd.DataFrame(rows, columns=["user_id", "time_us", "event_name", "item_id"])
    frame["event_time"] = pd.to_datetime(frame.pop("time_us"), unit="us")
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture
def hard_warehouse(tmp_path):
    """A warehouse whose raw_events hold `hard_journeys`, split over two files (ties across files)."""
    frame = hard_journeys()
    files = []
    for part, rows in enumerate(np.array_split(np.arange(len(frame)), 2)):
        path = tmp_path / f"events-{part}.parquet"
        frame.iloc[rows].to_parquet(path, index=False)
        files.append(InputFile(path, "parquet", get_format("canonical")))
    warehouse = DuckDBWarehouse(paths=TraceDagsterPaths(home=str(tmp_path / "home")))
    with warehouse.connect() as con:
        summary = ingest(warehouse, con, files)
    assert summary.rows_accepted == len(frame) and summary.rows_rejected == 0
    return warehouse


@pytest.mark.parametrize("batch_rows", [122_880, 1000, 7])
def test_streamed_sort_equals_the_window_sql(hard_warehouse, monkeypatch, batch_rows):
    """Every column and value, exactly (floats bit for bit), as the two-sort window SQL gave it,
    with batch borders anywhere: inside sessions, between users, between buckets."""
    monkeypatch.setattr(sessionized_events_module, "STREAM_BATCH_ROWS", batch_rows)
    with hard_warehouse.connect() as con:
        run = build_sessionized_events(hard_warehouse, con, 7200, full_rebuild=True)
        raw_columns = [r[0] for r in con.execute("DESCRIBE SELECT * FROM raw_events").fetchall()]
        new = con.sql("SELECT * FROM sessionized_events ORDER BY source_file, source_row").df()
        old = con.sql(
            f"SELECT * FROM ({window_sql_oracle('raw_events', raw_columns, 7200)}) ORDER BY source_file, source_row"
        ).df()
        oracle_schema = con.execute(f"DESCRIBE {window_sql_oracle('raw_events', raw_columns, 7200)}").fetchall()
        schema = con.execute("DESCRIBE sessionized_events").fetchall()
        parts = [p for (p,) in con.execute("SELECT path FROM warehouse_parquet_files").fetchall() if "sessionized" in p]
        out_of_order = con.execute(
            "SELECT count(*) FROM (SELECT user_id, event_index, lag(user_id) OVER w AS prev_user, "
            "lag(event_index) OVER w AS prev_index FROM read_parquet(?, filename = true, file_row_number = true) "
            "WINDOW w AS (PARTITION BY filename ORDER BY file_row_number)) "
            "WHERE (prev_user = user_id AND event_index <> prev_index + 1) OR prev_user > user_id",
            [parts],
        ).fetchall()[0][0]
    assert [c[:2] for c in schema] == [c[:2] for c in oracle_schema]
    assert run.rows_written == len(new) == len(old) > 20_000
    pd.testing.assert_frame_equal(new, old, check_exact=True)
    assert old.groupby("user_id").session_index.max().max() > 100  # users with many sessions
    assert (old.groupby("user_id").size() == 1).sum() > 30  # one-event users
    assert ((old.seconds_since_prev_event == 7200) & (old.event_index_in_session > 0)).sum() > 100
    assert ((old.seconds_since_prev_event == 7200.000001) & (old.event_index_in_session == 0)).sum() > 100
    assert (old.seconds_since_prev_event == 0).sum() - (old.event_index == 0).sum() > 1000  # ties
    assert len(parts) == 32 and out_of_order == 0  # one part per bucket, journeys in order


def test_bucket_sql_is_md5_number_lower():
    """The bucket files persist across runs: the cheaper expression must give md5_number_lower's buckets."""
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE ids AS SELECT 'u' || i::VARCHAR || repeat('x', i % 13) AS user_id FROM range(200000) t(i) "
        "UNION ALL SELECT * FROM (VALUES (''), ('ü'), ('a:b'), (' '), ('1234567890123456789012345678901234')) v(user_id)"
    )
    for n in (32, 7, 1000, 1):
        (differ,) = con.execute(
            f"SELECT count(*) FILTER ({user_bucket_sql(n)} <> CAST(md5_number_lower(user_id) % {n} AS INTEGER)) "
            "FROM ids"
        ).fetchall()[0]
        assert differ == 0, n


@pytest.fixture
def check_con():
    con = duckdb.connect()
    raw = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b"],
            "event_time": pd.to_datetime(
                ["2026-01-05 10:00", "2026-01-05 10:01", "2026-01-05 18:00", "2026-01-05 09:00"]
            ),
            "event_name": ["home"] * 4,
            "source_file": ["f"] * 4,
            "source_row": [1, 2, 3, 4],
        }
    )
    good = sessionize_pandas(raw)
    con.register("raw_frame", raw)
    con.register("good_frame", good)
    con.execute("CREATE TABLE raw_events AS SELECT * FROM raw_frame")
    con.execute("CREATE TABLE sessionized_events AS SELECT * FROM good_frame")
    yield con
    con.close()


def test_checks_pass_on_a_correct_table(check_con):
    assert check_session_keys_not_null(check_con).passed
    assert check_positions_contiguous(check_con).passed
    assert check_rows_match_raw_events(check_con).passed


@pytest.mark.parametrize(
    "breakage, metadata_key",
    [
        ("UPDATE sessionized_events SET event_index = 5 WHERE source_row = 3", "users_with_gaps"),
        ("UPDATE sessionized_events SET session_index = 2, session_id = 'a:2' WHERE source_row = 3", "users_with_gaps"),
        ("UPDATE sessionized_events SET event_index_in_session = 0 WHERE source_row = 2", "sessions_with_gaps"),
        ("UPDATE sessionized_events SET session_id = 'a:9' WHERE source_row = 2", "sessions_with_gaps"),
    ],
)
def test_positions_check_fails_on_gaps_and_repeats(check_con, breakage, metadata_key):
    check_con.execute(breakage)
    result = check_positions_contiguous(check_con)
    assert not result.passed and result.metadata[metadata_key].value > 0


def test_keys_and_row_count_checks_fail(check_con):
    check_con.execute("UPDATE sessionized_events SET session_id = NULL WHERE source_row = 4")
    assert not check_session_keys_not_null(check_con).passed
    check_con.execute("DELETE FROM sessionized_events WHERE source_row = 4")
    assert not check_rows_match_raw_events(check_con).passed
