"""The real public slices in ../shared/data: nothing lost, and sessions agree with pandas.

Expected values are derived here from the files themselves (Python's csv module + pandas), never
typed in: the only facts taken from the data README are the kinds of defects to look for.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pandas as pd
import pytest
from helpers import SHARED_DATA, check_results, materialize_pipeline, pipeline_resources, query

from bench.pandas_reference import sessionize_pandas

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data slices not present")
TAOBAO = SHARED_DATA / "taobao_userbehavior"
REES46 = SHARED_DATA / "rees46" / "2019-Oct_head.csv.gz"
RETAILROCKET = SHARED_DATA / "retailrocket" / "events_sample.csv.gz"


def read_rows(path: Path, header: bool) -> tuple[list[str], pd.DataFrame, int]:
    """(column names, complete rows with their 1-based line numbers, last line number)."""
    with gzip.open(path, "rt", newline="") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    records = list(csv.reader(lines))
    names = records[0] if header else ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
    first = 2 if header else 1
    complete = [
        [line_no, *fields]
        for line_no, fields in enumerate(records[first - 1 :], start=first)
        if len(fields) == len(names)
    ]
    frame = pd.DataFrame(complete, columns=["source_row", *names])
    return names, frame, len(lines)


def expected_split(frame: pd.DataFrame, value_columns: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """(accepted rows, duplicate flags): exact duplicates of an earlier complete row are rejected."""
    duplicated = frame.duplicated(subset=value_columns, keep="first")
    return frame[~duplicated], duplicated


def ingest_real(tmp_path_factory, events: str, fmt: str) -> Path:
    home = tmp_path_factory.mktemp(fmt) / "home"
    result = materialize_pipeline(pipeline_resources(home, events, fmt), max_rejected_share=0.05)
    assert result.success and all(check_results(result).values()), check_results(result)
    return home


def assert_every_row_accounted(home: Path, path: Path, data_rows: range) -> pd.DataFrame:
    """raw_events and rejected_events partition the file's data rows exactly."""
    source = str(path.resolve())
    accepted = query(home, f"SELECT source_row FROM raw_events WHERE source_file = '{source}'")
    rejected = query(home, f"SELECT source_row, reason, raw FROM rejected_events WHERE source_file = '{source}'")
    rows = list(accepted.source_row) + list(rejected.source_row)
    assert len(rows) == len(set(rows)) and set(rows) == set(data_rows)
    (rows_read,) = query(home, f"SELECT rows_read FROM ingested_files WHERE source_file = '{source}'").rows_read
    assert rows_read == len(data_rows)
    return rejected


def assert_sessions_match_pandas(home: Path, expected: pd.DataFrame) -> None:
    """Session count and every row's positions equal the pandas computation on our own parse."""
    reference = sessionize_pandas(expected, 7200)
    sql = query(
        home,
        "SELECT source_file, source_row, session_index, event_index, event_index_in_session FROM sessionized_events",
    )
    (sessions,) = query(home, "SELECT count(DISTINCT session_id) AS n FROM sessionized_events").n
    assert sessions == reference.session_id.nunique()
    merged = sql.merge(reference, on=["source_file", "source_row"], suffixes=("", "_pd"))
    assert len(merged) == len(sql) == len(reference)
    for column in ("session_index", "event_index", "event_index_in_session"):
        assert (merged[column] == merged[f"{column}_pd"]).all(), column


@pytest.fixture(scope="module")
def taobao_home(tmp_path_factory):
    return ingest_real(tmp_path_factory, str(TAOBAO / "*.csv.gz"), "taobao")


def test_taobao_slices_every_row_accounted_and_truncated_row_rejected(taobao_home):
    expected_frames = []
    for name in ("userbehavior_head.csv.gz", "userbehavior_tail.csv.gz"):
        path = TAOBAO / name
        names, complete, last_line = read_rows(path, header=False)
        rejected = assert_every_row_accounted(taobao_home, path, range(1, last_line + 1))
        accepted, duplicated = expected_split(complete, names)
        incomplete = sorted(set(range(1, last_line + 1)) - set(complete.source_row))
        assert sorted(rejected.source_row) == sorted(incomplete + list(complete.source_row[duplicated]))
        if name.startswith("userbehavior_head"):  # its last line is cut short (data README)
            truncated = rejected[rejected.source_row == last_line]
            assert truncated.reason.tolist() == ["truncated_row"]
            assert truncated.raw.iloc[0].count(",") == 3
        expected_frames.append(
            accepted.assign(
                source_file=str(path.resolve()),
                event_time=pd.to_datetime(accepted.timestamp.astype("int64"), unit="s"),
            )
        )
    assert_sessions_match_pandas(taobao_home, pd.concat(expected_frames, ignore_index=True))


def test_taobao_outliers_are_accepted_as_documented(taobao_home):
    """The dataset's events before 2017-11-25 are real rows with a plausible date: kept."""
    early = query(taobao_home, "SELECT count(*) AS n FROM raw_events WHERE event_time < '2017-11-24'").n[0]
    assert early > 0
    assert (
        query(taobao_home, "SELECT count(*) AS n FROM rejected_events WHERE reason = 'event_time_out_of_range'").n[0]
        == 0
    )


@pytest.fixture(scope="module")
def rees46_home(tmp_path_factory):
    return ingest_real(tmp_path_factory, str(REES46), "rees46")


def test_rees46_slice_every_row_accounted_and_sessions_match(rees46_home):
    names, complete, last_line = read_rows(REES46, header=True)
    rejected = assert_every_row_accounted(rees46_home, REES46, range(2, last_line + 1))
    accepted, duplicated = expected_split(complete, names)
    incomplete = sorted(set(range(2, last_line + 1)) - set(complete.source_row))
    reasons = dict(zip(rejected.source_row, rejected.reason))
    assert {row: reasons[row] for row in complete.source_row[duplicated]} == {
        row: "duplicate" for row in complete.source_row[duplicated]
    }
    assert sorted(reasons) == sorted(incomplete + list(complete.source_row[duplicated]))
    expected = accepted.assign(
        source_file=str(REES46.resolve()),
        event_time=pd.to_datetime(accepted.event_time.str.removesuffix(" UTC")),
    )
    assert_sessions_match_pandas(rees46_home, expected)
    categories = query(
        rees46_home,
        "SELECT count(*) FILTER (category IS NULL) AS missing, count(DISTINCT brand) AS brands FROM raw_events",
    )
    assert categories.missing[0] == 0 and categories.brands[0] > 10  # category_id fallback


@pytest.fixture(scope="module")
def retailrocket_home(tmp_path_factory):
    return ingest_real(tmp_path_factory, str(RETAILROCKET), "retailrocket")


def test_retailrocket_duplicates_rejected_and_sessions_match(retailrocket_home):
    names, complete, last_line = read_rows(RETAILROCKET, header=True)
    rejected = assert_every_row_accounted(retailrocket_home, RETAILROCKET, range(2, last_line + 1))
    accepted, duplicated = expected_split(complete, names)
    assert duplicated.sum() > 0  # the README's real duplicates, found by pandas too
    assert sorted(rejected.source_row) == sorted(complete.source_row[duplicated])
    assert set(rejected.reason) == {"duplicate"}
    expected = accepted.assign(
        source_file=str(RETAILROCKET.resolve()),
        user_id=accepted.visitorid,
        event_time=pd.to_datetime(accepted.timestamp.astype("int64"), unit="ms"),
    )
    assert_sessions_match_pandas(retailrocket_home, expected)
