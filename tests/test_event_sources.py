"""Readers and format presets: line numbering, splitting, time parsing, input expansion."""

from __future__ import annotations

import gzip
import os

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
from helpers import write_lines

from resources.event_sources import (
    LINE_SCHEMA,
    EventSource,
    EventSourceError,
    InputFile,
    expand_inputs,
    get_format,
    iter_line_batches,
    stage_file,
    time_expression,
)
from resources.paths import TraceDagsterPaths


def read_lines(path, chunk_bytes):
    batches = list(iter_line_batches(path, chunk_bytes=chunk_bytes))
    table = pa.Table.from_batches(batches, schema=LINE_SCHEMA)
    return [
        (row, line.decode("utf-8", "replace"), unterminated)
        for row, line, unterminated in zip(*(table.column(i).to_pylist() for i in range(3)))
    ]


@pytest.mark.parametrize("chunk_bytes", [3, 7, 1 << 20])
def test_lines_keep_physical_numbering_across_chunks_crlf_and_blank_lines(tmp_path, chunk_bytes):
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"a,b\r\n\nc,d\r\r\ne\nlast")
    assert read_lines(path, chunk_bytes) == [
        (1, "a,b\r", False),
        (2, "", False),
        (3, "c,d\r\r", False),
        (4, "e", False),
        (5, "last", True),
    ]


def test_gzip_is_detected_by_content_not_name(tmp_path):
    path = tmp_path / "events.csv"  # gzip bytes under a plain .csv name
    path.write_bytes(gzip.compress(b"x\ny\n"))
    assert [line for _, line, _ in read_lines(path, 1 << 20)] == ["x", "y"]


def test_empty_file_has_no_lines(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert read_lines(path, 1024) == []


def test_expand_inputs_file_folder_glob(tmp_path):
    a = write_lines(tmp_path / "in" / "a.csv", ["x"])
    b = write_lines(tmp_path / "in" / "sub" / "b.csv.gz", ["x"])
    readme = write_lines(tmp_path / "in" / "README.md", ["notes"])
    assert expand_inputs(str(a)) == ([a.resolve()], [])
    assert expand_inputs(str(tmp_path / "in")) == ([a.resolve(), b.resolve()], [readme.resolve()])
    assert expand_inputs(str(tmp_path / "in" / "*.csv")) == ([a.resolve()], [])
    with pytest.raises(EventSourceError, match="matches no file"):
        expand_inputs(str(tmp_path / "nothing*.csv"))
    with pytest.raises(EventSourceError, match="no such file"):
        expand_inputs(str(tmp_path / "missing.csv"))
    with pytest.raises(EventSourceError, match="unsupported file type"):
        expand_inputs(str(readme))


def test_unknown_format_is_a_clear_error():
    with pytest.raises(EventSourceError, match="unknown events format 'parquetish'"):
        get_format("parquetish")


def test_env_vars_configure_the_source(monkeypatch, home, tmp_path):
    paths = TraceDagsterPaths(home=str(home))
    assert EventSource(paths=paths).uses_simulator
    monkeypatch.setenv("TRACE_DAGSTER_EVENTS", str(tmp_path))
    monkeypatch.setenv("TRACE_DAGSTER_EVENTS_FORMAT", "Taobao")
    source = EventSource(paths=paths)
    assert not source.uses_simulator and source.preset.name == "taobao"
    assert EventSource(paths=paths, events_format="rees46").preset.name == "rees46"


def test_home_defaults_to_dot_trace_dagster_under_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("TRACE_DAGSTER_HOME")
    monkeypatch.chdir(tmp_path)
    paths = TraceDagsterPaths()
    assert paths.warehouse_path == tmp_path.resolve() / ".trace_dagster" / "warehouse.duckdb"
    assert paths.parquet_dir.is_dir()


@pytest.fixture
def con():
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    yield connection
    connection.close()


@pytest.mark.parametrize(
    "text, unit, expected",
    [
        ("2019-10-01 00:00:00 UTC", "auto", "2019-10-01 00:00:00"),
        ("2019-10-01T02:30:00+02:00", "auto", "2019-10-01 00:30:00"),
        ("2019-10-01 00:00:00", "auto", "2019-10-01 00:00:00"),  # no zone means UTC
        ("1511544070", "auto", "2017-11-24 17:21:10"),
        ("1511544070", "s", "2017-11-24 17:21:10"),
        ("1433193132535", "ms", "2015-06-01 21:12:12.535"),
        ("yesterday-ish", "auto", None),
        ("99999999999999999999", "s", None),  # overflow: NULL, not an error
    ],
)
def test_time_expression(con, text, unit, expected):
    (value,) = con.execute(f"SELECT {time_expression('$t', unit)}", {"t": text}).fetchall()[0]
    assert value == (pd.Timestamp(expected).to_pydatetime() if expected else None)


def staged_frame(con, path, fmt):
    staged = stage_file(con, InputFile(path, "csv", get_format(fmt)), 0)
    return con.execute(staged.query + " ORDER BY source_row").df(), staged


def test_quoted_fields_keep_commas_and_quotes(con, tmp_path):
    path = write_lines(
        tmp_path / "q.csv",
        [
            "user_id,event_time,event_name,destination",
            'u1,2026-01-05 10:00:00,search,"Paris, France"',
            'u1,2026-01-05 10:01:00,search,"say ""hi"""',
            'u1,2026-01-05 10:02:00,search,"unbalanced',
        ],
    )
    frame, staged = staged_frame(con, path, "canonical")
    assert staged.attributes == ["destination"] and staged.rows_read == 3
    assert frame["destination"].tolist()[:2] == ["Paris, France", 'say "hi"']
    assert frame["structural_reason"].tolist()[:2] == [None, None]
    assert frame["structural_reason"].iloc[2] == "malformed_quoting"


def test_header_without_required_columns_is_a_clear_error(con, tmp_path):
    path = write_lines(tmp_path / "bad.csv", ["user_id,event_name", "u1,search"])
    with pytest.raises(EventSourceError, match=r"missing \['event_time'\]"):
        staged_frame(con, path, "canonical")


def test_rees46_maps_category_code_with_category_id_fallback(con, tmp_path):
    path = write_lines(
        tmp_path / "r.csv",
        [
            "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session",
            "2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,s1",
            "2019-10-01 00:00:01 UTC,cart,3900821,2053013552326770905,appliances.water_heater,aqua,33.20,554748717,s2",
        ],
    )
    frame, staged = staged_frame(con, path, "rees46")
    assert staged.attributes == ["category_id", "brand", "price", "user_session"]
    assert frame["category"].tolist() == ["2103807459595387724", "appliances.water_heater"]
    assert frame["item_id"].tolist() == ["44600062", "3900821"]
    assert frame["event_name"].tolist() == ["view", "cart"]
    assert frame["price"].tolist() == ["35.79", "33.20"]  # attributes stay text


def test_simulated_source_is_written_once_and_deterministic(home, tmp_path):
    paths = TraceDagsterPaths(home=str(home))
    source = EventSource(paths=paths, simulator_n_users=60, simulator_days=7, simulator_seed=3)
    first = source.simulated_file()
    stamp = os.stat(first).st_mtime_ns
    assert source.simulated_file() == first and os.stat(first).st_mtime_ns == stamp
    assert "n_users=60" in first.name and "seed=3" in first.name
    other_home = TraceDagsterPaths(home=str(tmp_path / "other"))
    again = EventSource(paths=other_home, simulator_n_users=60, simulator_days=7, simulator_seed=3).simulated_file()
    pd.testing.assert_frame_equal(pd.read_parquet(first), pd.read_parquet(again))
    reseeded = EventSource(paths=other_home, simulator_n_users=60, simulator_days=7, simulator_seed=4).simulated_file()
    assert not pd.read_parquet(first).equals(pd.read_parquet(reseeded))


def test_simulator_frames_are_identical_for_the_same_config():
    from resources.event_sources.simulator import SimulatorConfig, simulate_events

    config = SimulatorConfig(n_users=40, days=5, seed=11)
    pd.testing.assert_frame_equal(simulate_events(config), simulate_events(config))
