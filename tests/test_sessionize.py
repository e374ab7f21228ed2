"""The served model's sessionizer (model_lib/sessionize.py) equals the warehouse's table.

Real data: the Taobao and Retailrocket slices go through the real ingestion and `sessionized_events`
assets (DuckDB's sort, streamed in batches through `sorted_session_columns`); the serving path then
sorts the same `raw_events` rows itself (shuffled first), and every session column must be equal
(the log features to float rounding). Retailrocket is the hard case: rows out of time
order, exact-time ties broken by (source_file, source_row).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from helpers import SHARED_DATA, check_results, materialize_pipeline, pipeline_resources, query

from model_lib.sessionize import (
    SESSION_COLUMNS,
    InvalidEventsError,
    _parse_plain_utc,
    parse_event_times,
    sessionize,
    sessionize_user,
    sorted_session_columns,
)

REAL = {
    "taobao": str(SHARED_DATA / "taobao_userbehavior" / "*.csv.gz"),
    "retailrocket": str(SHARED_DATA / "retailrocket" / "events_sample.csv.gz"),
}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data slices not present")
@pytest.mark.parametrize("fmt", sorted(REAL))
def test_sessionizer_equals_the_sql_on_real_data(tmp_path, fmt):
    home = tmp_path / "home"
    result = materialize_pipeline(pipeline_resources(home, REAL[fmt], fmt), max_rejected_share=0.05)
    assert result.success and all(check_results(result).values())
    raw = query(home, "SELECT * EXCLUDE (ingested_at) FROM raw_events")
    sql = query(home, "SELECT * EXCLUDE (ingested_at) FROM sessionized_events ORDER BY user_id, event_index")
    # shuffled: the sessionizer must not rely on the input order when source_file/source_row exist
    ours = sessionize(raw.sample(frac=1.0, random_state=0), session_gap_seconds=7200)
    assert len(ours) == len(sql) > 1000
    ours = ours.sort_values(["user_id", "event_index"]).reset_index(drop=True)
    assert (ours["source_row"].to_numpy() == sql["source_row"].to_numpy()).all()
    assert (ours["event_time"].to_numpy() == sql["event_time"].to_numpy()).all()
    for column in SESSION_COLUMNS:
        if column.startswith("log_") or column.startswith("seconds_"):
            np.testing.assert_allclose(
                ours[column].to_numpy(float), sql[column].to_numpy(float), rtol=1e-12, err_msg=column
            )
        else:
            assert (ours[column].astype(str).to_numpy() == sql[column].astype(str).to_numpy()).all(), column
    assert sql["session_index"].max() > 0  # multi-session users were compared


def test_request_order_breaks_ties_and_gaps_start_sessions():
    events = pd.DataFrame(
        {
            "user_id": [7, 7, 7, 8],
            "event_time": ["2024-01-01T10:00:00Z", "2024-01-01T10:00:00Z", "1704110400", "2024-01-01T09:00:00+01:00"],
            "event_name": ["a", "b", "c", "a"],
        }
    )
    out = sessionize(events, session_gap_seconds=3600)
    seven = out[out["user_id"] == "7"]
    assert list(seven["event_name"]) == ["a", "b", "c"]  # same second: the request's order
    assert list(seven["session_index"]) == [0, 0, 1]  # 1704110400 = 12:00 UTC, 2 h later
    assert list(seven["session_id"]) == ["7:0", "7:0", "7:1"]
    eight = out[out["user_id"] == "8"].iloc[0]
    assert eight["event_time"] == pd.Timestamp("2024-01-01T08:00:00") and eight["hour_of_day"] == 8
    assert eight["day_of_week"] == 0  # a Monday


@pytest.mark.parametrize(
    "bad", ["yesterday", "2024-13-01T00:00:00", None, "2024-02-30T00:00:00Z", "2024-01-01T24:00:00Z"]
)
def test_bad_times_are_named_not_dropped(bad):
    with pytest.raises(InvalidEventsError, match="event_time"):
        parse_event_times(pd.Series(["2024-01-01T00:00:00Z", bad], dtype=object))


def test_missing_columns_are_named():
    with pytest.raises(InvalidEventsError, match="event_name"):
        sessionize(pd.DataFrame({"user_id": ["u"], "event_time": ["2024-01-01"]}))


@pytest.mark.parametrize(
    "times, plain",
    [
        (["2024-02-29T23:59:59Z", "1999-12-31T00:00:00Z"], True),  # what clients send: parsed by numpy
        (["2024-01-01T10:00:00.5Z", "2024-01-01T10:00:00.1Z"], True),
        (["2024-01-01T10:00:00.123456Z"], True),
        (["2024-01-01T10:00:00.1234567Z"], False),  # nanoseconds, mixed widths, zones, epochs, ...
        (["2024-01-01T10:00:00Z", "2024-01-01T10:00:00.5Z"], False),
        (["2024-01-01T10:00:00+01:00"], False),
        (["2024-01-01T10:00:00"], False),
        (["2024-01-01 10:00:00Z"], False),
        (["1704110400"], False),
        (["1850-01-01T00:00:00Z"], False),
    ],
)
def test_plain_utc_strings_parse_as_pandas_does(times, plain):
    values = np.array(times, dtype=object)
    assert (_parse_plain_utc(values) is not None) == plain

    def naive_utc(text: str) -> pd.Timestamp:
        t = pd.Timestamp(int(text), unit="s") if text.isdigit() else pd.Timestamp(text)
        return (t.tz_convert(None) if t.tzinfo else t).floor("us")

    index = [5 + i for i in range(len(times))]
    parsed = parse_event_times(pd.Series(values, index=index, name="event_time"))
    assert list(parsed.index) == index and str(parsed.dtype) == "datetime64[us]"
    assert list(parsed) == [naive_utc(t) for t in times]


@pytest.mark.parametrize(
    "times",
    [
        ["2024-0X-01T10:00:00Z"],  # a letter where a digit goes
        ["2024/01/01T10:00:00Z"],  # another separator
        ["2024-01-01T10:00:00Z", "2024-01-01T10:00:00\n"],  # a newline where the zone goes
        ["2024-01-01T10:00:00.12Z", "2024-01-01T10:00:00,12Z"],  # a comma for the point
        ["2024-01-01T10:00:00Z", "2024-01-01T10:00:0\n\nZ"],  # rows of the right total length
    ],
)
def test_the_plain_utc_parser_leaves_anything_off_its_layout(times):
    assert _parse_plain_utc(np.array(times, dtype=object)) is None


def test_one_user_arrays_equal_the_frame():
    t0 = pd.Timestamp("2024-03-01T10:00:00")
    events = pd.DataFrame(
        {
            "user_id": "u",
            "event_time": [f"{t0 + pd.Timedelta(minutes=m):%Y-%m-%dT%H:%M:%SZ}" for m in (200, 0, 0, 1, 0, 500)],
            "event_name": ["a", "b", "c", "d", "e", "f"],
            "source_file": ["f2", "f1", "f1", "f1", "f0", "f1"],
            "source_row": [1, 9, 3, 4, 7, 2],
            "device": ["x", None, "y", "x", "y", None],
        }
    )
    plain = events.drop(columns=["source_file", "source_row"])
    in_time_order = plain.iloc[np.argsort(plain["event_time"].to_numpy(), kind="stable")]  # no reordering to do
    for frame in (events, plain, in_time_order, events.head(1)):
        expected = sessionize(frame, session_gap_seconds=3600)
        arrays = sessionize_user(frame, session_gap_seconds=3600)
        assert list(arrays) == [c for c in expected.columns if c != "session_id"]
        for column, values in arrays.items():
            np.testing.assert_array_equal(values, expected[column].to_numpy(), err_msg=column)
            assert values.dtype == expected[column].dtype, column
        # a served model asks for its encoder's columns only (an absent one is skipped)
        some = sessionize_user(frame, session_gap_seconds=3600, columns=["device", "absent"])
        assert "device" in some and "absent" not in some and "event_name" not in some
        np.testing.assert_array_equal(some["device"], expected["device"].to_numpy())
        np.testing.assert_array_equal(some["session_index"], expected["session_index"].to_numpy())


def test_batches_with_a_carry_equal_one_call():
    """The warehouse streams sorted rows through the rule in batches: any split, same columns."""
    rng = np.random.default_rng(3)
    users = np.sort(rng.integers(0, 12, 400))
    first_of_user = np.r_[True, users[1:] != users[:-1]]
    steps = rng.choice([0, 1, 7_200_000_000, 7_200_000_001, 10**10], size=len(users))
    time_us = np.where(first_of_user, 0, steps).cumsum() + users * 10**13  # sorted within each user
    whole, _ = sorted_session_columns(first_of_user, time_us, 7200)
    for borders in ([0, 0, 1, 2, 3, 3, 400], [0, 137, 138, 260, 400], list(range(0, 401, 9)) + [400]):
        carry, pieces = None, []
        for lo, hi in itertools.pairwise(borders):
            columns, carry = sorted_session_columns(first_of_user[lo:hi], time_us[lo:hi], 7200, carry)
            pieces.append(columns)
        for column, values in whole.items():
            np.testing.assert_array_equal(np.concatenate([c[column] for c in pieces]), values, err_msg=column)
    assert whole["session_index"].max() > 5 and (whole["seconds_since_prev_event"] == 7200).any()
    with pytest.raises(ValueError, match="carry"):
        sorted_session_columns(np.array([False]), np.array([0]), 7200)


@pytest.mark.parametrize("missing", [None, float("nan"), pd.NA, pd.NaT])
@pytest.mark.parametrize("column", ["user_id", "event_name"])
def test_missing_values_are_counted_in_any_form(column, missing):
    events = pd.DataFrame(
        {"user_id": "u", "event_time": ["2024-01-01T00:00:00Z"] * 4, "event_name": ["a", "b", "a", "c"]}, dtype=object
    )
    events.loc[[1, 3], column] = missing
    for sessionizer in (sessionize, sessionize_user):
        with pytest.raises(InvalidEventsError, match=f"{column}: 2 missing value"):
            sessionizer(events)


def test_unhashable_values_are_checked_row_by_row():
    from model_lib.sessionize import _may_have_missing

    assert _may_have_missing(np.array([["a"], None], dtype=object))
    assert not _may_have_missing(np.array(["a", "b", "a"], dtype=object))
    assert _may_have_missing(np.arange(3))  # not objects: pd.isna decides
