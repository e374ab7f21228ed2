"""sessionized_events: exact semantics on a hand-made journey, the pandas reference, the checks."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd
import pytest
from helpers import check_results, materialize_pipeline, pipeline_resources, query, write_lines

from assets.ingestion.sessionized_events import (
    SESSION_COLUMNS,
    check_positions_contiguous,
    check_rows_match_raw_events,
    check_session_keys_not_null,
)
from bench.pandas_reference import sessionize_pandas

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
