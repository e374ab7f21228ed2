"""Event sources: the built-in simulator and file readers for the contract's four formats.

A reader turns one input file into a *staged* SQL relation: one row per input row, every source
column as VARCHAR, mapped onto the canonical names, with the 1-based `source_row`, the row's raw
text and a structural rejection reason (bad UTF-8, wrong column count, truncated row, ...).
Nothing is dropped here; deciding what is accepted is the job of `assets/ingestion.py`, which owns
the validation SQL and the tables.

Why CSV lines are split by us and not by DuckDB's CSV reader: rows must keep their physical line
number and their exact text, including the bad ones. DuckDB's reader gives neither for accepted
rows, and with mixed `\\n` / `\\r\\n` endings it can emit phantom empty rows, so line numbers drift.
Lines are therefore cut with pyarrow (vectorised, streamed in chunks, gzip-aware) and split into
fields in DuckDB SQL (`string_split`, or a quote-aware regex for the rare lines with quotes).
Parquet goes straight through `read_parquet(file_row_number = true)`.

Files that grow: a CSV read can start at a `LineCursor` (the byte offset, in the decompressed
stream, just past the last newline read before, and the line number there) and stops at the
size the file had when it was hashed, so rows appended while it is read wait for the next run.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from resources.paths import TraceDagsterPaths
from resources.warehouse import quote_ident, sql_literal

EVENTS_ENV_VAR = "TRACE_DAGSTER_EVENTS"
FORMAT_ENV_VAR = "TRACE_DAGSTER_EVENTS_FORMAT"

CANONICAL_KEYS = ("user_id", "event_time", "event_name")
CANONICAL_OPTIONAL = ("item_id", "category")
# Columns the pipeline adds downstream: an input attribute with one of these names would collide.
RESERVED_NAMES = frozenset(
    {
        "source_file",
        "source_row",
        "ingested_at",
        "raw",
        "reason",
        "detail",
        "structural_reason",
        "event_time_text",
        "file_ord",
        "session_id",
        "session_index",
        "event_index",
        "event_index_in_session",
        "seconds_since_prev_event",
        "seconds_since_session_start",
        "log_seconds_since_prev_event",
        "log_seconds_since_session_start",
        "hour_of_day",
        "day_of_week",
    }
)
CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv.gz", ".txt", ".txt.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
LINE_CHUNK_BYTES = 32 << 20

# A CSV field: a quoted field (with "" escapes) or an unquoted run without quotes, then a comma.
QUOTED_FIELD_RE = r'("(?:[^"]|"")*"|[^,"]*),'


class EventSourceError(ValueError):
    """An input that cannot be read at all (no such file, header without the required columns,
    unknown format). Row-level problems are never raised: they become rejected rows."""


@dataclass(frozen=True)
class FormatPreset:
    """How one public schema maps onto the canonical event format.

    `columns` maps canonical names to source column names; `category_fallback` is used where the
    preferred category column is empty (REES46 `category_code` is often null, `category_id` never).
    Source columns not consumed by the mapping are kept as VARCHAR attributes.
    """

    name: str
    has_header: bool
    columns: dict[str, str]
    time_unit: str  # "auto" (ISO-8601 or epoch seconds), "s" or "ms"
    header_columns: tuple[str, ...] = ()  # the fixed layout of headerless CSV
    category_fallback: str | None = None
    numeric_ids: bool = False  # the real datasets use integer ids: anything else is malformed
    event_names: frozenset[str] | None = None  # None: any name without control characters
    notes: str = ""

    @property
    def required_sources(self) -> tuple[str, ...]:
        return tuple(self.columns[key] for key in CANONICAL_KEYS)


FORMATS: dict[str, FormatPreset] = {
    "canonical": FormatPreset(
        name="canonical",
        has_header=True,
        columns={c: c for c in (*CANONICAL_KEYS, *CANONICAL_OPTIONAL)},
        time_unit="auto",
        notes="header with user_id,event_time,event_name[,item_id,category,...attributes]",
    ),
    "taobao": FormatPreset(
        name="taobao",
        has_header=False,
        header_columns=("user_id", "item_id", "category_id", "behavior_type", "timestamp"),
        columns={
            "user_id": "user_id",
            "event_time": "timestamp",
            "event_name": "behavior_type",
            "item_id": "item_id",
            "category": "category_id",
        },
        time_unit="s",
        numeric_ids=True,
        event_names=frozenset({"pv", "cart", "fav", "buy"}),
        notes="Tianchi UserBehavior.csv, no header, Unix seconds",
    ),
    "rees46": FormatPreset(
        name="rees46",
        has_header=True,
        columns={
            "user_id": "user_id",
            "event_time": "event_time",
            "event_name": "event_type",
            "item_id": "product_id",
            "category": "category_code",
        },
        category_fallback="category_id",
        time_unit="auto",
        numeric_ids=True,
        event_names=frozenset({"view", "cart", "remove_from_cart", "purchase"}),
        notes="REES46 multi-category store; brand, price, user_session, category_id kept",
    ),
    "retailrocket": FormatPreset(
        name="retailrocket",
        has_header=True,
        columns={
            "user_id": "visitorid",
            "event_time": "timestamp",
            "event_name": "event",
            "item_id": "itemid",
        },
        time_unit="ms",
        numeric_ids=True,
        event_names=frozenset({"view", "addtocart", "transaction"}),
        notes="Retailrocket events.csv, Unix milliseconds; transactionid kept",
    ),
}


def get_format(name: str) -> FormatPreset:
    try:
        return FORMATS[name.strip().lower()]
    except KeyError:
        raise EventSourceError(
            f"unknown events format {name!r}; expected one of {sorted(FORMATS)} (set {FORMAT_ENV_VAR})"
        ) from None


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "csv" or "parquet"
    preset: FormatPreset

    @property
    def source_file(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class LineCursor:
    """Where a CSV read stopped: `offset` bytes of the decompressed stream up to and including
    the last newline, and `row`, the 1-based line number of the line that starts there."""

    offset: int = 0
    row: int = 1


@dataclass
class StagedInput:
    """One input file as a SQL relation with the staged columns (see `staged_columns`).

    `end` is where the next read of a grown CSV file resumes (None for parquet, which is never
    appended to in place).
    """

    source_file: str
    query: str
    attributes: list[str]
    rows_read: int
    preset: FormatPreset
    temp_tables: list[str] = field(default_factory=list)
    end: LineCursor | None = None


def staged_columns(attributes: list[str]) -> list[str]:
    """Column order of every staged relation; attributes come last, all VARCHAR."""
    return [
        "source_row",
        "raw",
        "structural_reason",
        "user_id",
        "event_time_text",
        "event_time",
        "event_name",
        "item_id",
        "category",
        *attributes,
    ]


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES) or name.endswith(".gz"):
        return "csv"
    return None


def expand_inputs(spec: str) -> tuple[list[Path], list[Path]]:
    """Files named by a path, a folder (searched recursively) or a glob, sorted.

    Returns (readable files, ignored files): a folder may hold a README next to the data, which
    is reported in the metadata rather than silently skipped or fatally rejected.
    """
    spec = os.path.expanduser(spec.strip())
    if any(ch in spec for ch in "*?["):
        candidates = [Path(p) for p in glob.glob(spec, recursive=True)]
        if not candidates:
            raise EventSourceError(f"{EVENTS_ENV_VAR}={spec!r} matches no file")
    else:
        path = Path(spec)
        if path.is_dir():
            candidates = [p for p in path.rglob("*")]
        elif path.is_file():
            if file_kind(path) is None:
                raise EventSourceError(f"{path}: unsupported file type; expected CSV, CSV.gz or parquet")
            return [path.resolve()], []
        else:
            raise EventSourceError(f"{EVENTS_ENV_VAR}={spec!r}: no such file or folder")
    files = sorted(p.resolve() for p in candidates if p.is_file() and not p.name.startswith("."))
    readable = [p for p in files if file_kind(p) is not None]
    ignored = [p for p in files if file_kind(p) is None]
    if not readable:
        raise EventSourceError(f"{EVENTS_ENV_VAR}={spec!r}: no CSV or parquet file found")
    return readable, ignored


def events_root(spec: str) -> Path:
    """The folder under which the files of an events spec (file, folder or glob) live."""
    spec = os.path.expanduser(spec.strip())
    if any(ch in spec for ch in "*?["):
        fixed = []
        for part in Path(spec).parts:
            if any(ch in part for ch in "*?["):
                break
            fixed.append(part)
        return Path(*fixed).resolve() if fixed else Path.cwd().resolve()
    path = Path(spec)
    return path.resolve() if path.is_dir() else path.resolve().parent


# Dagster refuses partition keys holding these (`...` separates a range's ends in the UI).
_KEY_ESCAPES = {"...": "..%2E", **{ch: f"%{ord(ch):02X}" for ch in "\a\b\f\n\r\t\v\0"}}


def partition_key_for(path: Path, root: Path) -> str:
    """A file's partition key: its POSIX path relative to the events root (`day1.csv`,
    `2026/01/day1.csv.gz`), the absolute path when it lies outside. Stable while the file grows
    or is rewritten in place: a new state of the same file re-materializes the same key."""
    resolved = path.resolve()
    try:
        key = resolved.relative_to(root).as_posix()
    except ValueError:
        key = resolved.as_posix()
    for bad, escaped in _KEY_ESCAPES.items():
        key = key.replace(bad, escaped)
    return key


def content_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def prefix_hashes(path: Path, size: int, prefix: int | None) -> tuple[str, str | None]:
    """SHA-256 of the file's first `size` bytes and, in the same pass, of its first `prefix`
    bytes (None when no prefix is asked or the file is shorter): is an earlier read still the
    beginning of this file?"""
    whole = hashlib.sha256()
    prefix_digest = None
    done = 0
    with open(path, "rb") as handle:
        while done < size:
            want = min(1 << 20, size - done)
            if prefix is not None and done < prefix:
                want = min(want, prefix - done)
            chunk = handle.read(want)
            if not chunk:
                break
            whole.update(chunk)
            done += len(chunk)
            if prefix is not None and done == prefix:
                prefix_digest = whole.copy().hexdigest()
    if prefix == 0:
        prefix_digest = hashlib.sha256().hexdigest()
    return whole.hexdigest(), prefix_digest


# ----------------------------------------------------------------------------------------------
# CSV: lines cut by pyarrow, fields split in SQL


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


class _BoundedReader(io.RawIOBase):
    """The first `limit` bytes of a file: a read never sees rows appended after hashing."""

    def __init__(self, path: Path, limit: int | None):
        self._handle = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = len(buffer) if self._left is None else min(len(buffer), self._left)
        data = self._handle.read(want)
        buffer[: len(data)] = data
        if self._left is not None:
            self._left -= len(data)
        return len(data)

    def close(self) -> None:
        self._handle.close()
        super().close()


def _open_text_stream(path: Path, limit: int | None) -> pa.NativeFile:
    raw = pa.PythonFile(io.BufferedReader(_BoundedReader(path, limit)), mode="r")
    return pa.CompressedInputStream(raw, "gzip") if _is_gzip(path) else raw


def iter_line_batches(
    path: Path,
    chunk_bytes: int = LINE_CHUNK_BYTES,
    start: LineCursor = LineCursor(),
    limit_bytes: int | None = None,
    progress: dict | None = None,
) -> Iterator[pa.RecordBatch]:
    """Physical lines of a (gzipped) text file as batches of (source_row, line, unterminated).

    `source_row` is the 1-based line number; `\\r` of CRLF endings stays on the line (stripped in
    SQL) so that a lone `\\r` cannot shift the numbering. A final line without a newline is
    flagged `unterminated`: with too few fields it is a truncated row, not just a short one.
    Reading starts at `start` (decompressed offset and its line number) and stops after
    `limit_bytes` bytes of the file on disk; `progress["end"]` is then the cursor just past the
    last newline, where the next read of a grown file resumes.
    """
    next_row = start.row
    offset = start.offset
    carry = b""

    def batch(lines: pa.Array, unterminated: bool) -> pa.RecordBatch:
        n = len(lines)
        return pa.record_batch(
            {
                "source_row": pa.array(np.arange(next_row, next_row + n, dtype=np.int64)),
                "line": lines,
                "unterminated": pa.array(np.full(n, unterminated)),
            }
        )

    with _open_text_stream(path, limit_bytes) as stream:
        skip = start.offset
        while skip > 0:  # gzip cannot seek: decompress and drop what was read before
            dropped = len(stream.read(min(skip, chunk_bytes)))
            if not dropped:
                break
            skip -= dropped
        while True:
            chunk = stream.read(chunk_bytes)
            if not chunk:
                break
            buffer = carry + chunk
            cut = buffer.rfind(b"\n")
            if cut < 0:
                carry = buffer
                continue
            carry = buffer[cut + 1 :]
            offset += cut + 1
            lines = pc.split_pattern(pa.array([buffer[:cut]], pa.large_binary()), b"\n").flatten()
            yield batch(lines, False)
            next_row += len(lines)
    if progress is not None:
        progress["end"] = LineCursor(offset, next_row)
    if carry:
        yield batch(pa.array([carry], pa.large_binary()), True)


def first_line(path: Path) -> bytes | None:
    """The file's first line (its header), None for an empty file."""
    for batch in iter_line_batches(path, chunk_bytes=1 << 16):
        lines = batch.column("line")
        return lines[0].as_py() if len(lines) else None
    return None


LINE_SCHEMA = pa.schema([("source_row", pa.int64()), ("line", pa.large_binary()), ("unterminated", pa.bool_())])


def _parse_header(line: bytes) -> list[str]:
    text = line.decode("utf-8-sig", errors="replace").rstrip("\r")
    return [name.strip() for name in next(csv.reader(io.StringIO(text)))]


def _check_names(names: list[str], where: str) -> None:
    lowered = [n.lower() for n in names]
    duplicates = sorted({n for n in lowered if lowered.count(n) > 1})
    if duplicates:
        raise EventSourceError(f"{where}: duplicate column names {duplicates}")
    if any(not n for n in names):
        raise EventSourceError(f"{where}: empty column name in the header")


def _mapping(preset: FormatPreset, names: list[str], where: str) -> tuple[dict[str, str], list[str]]:
    """(canonical -> source column, attribute columns) for a file with columns `names`."""
    lowered = {n.lower(): n for n in names}
    missing = [c for c in preset.required_sources if c.lower() not in lowered]
    if missing:
        raise EventSourceError(
            f"{where}: format {preset.name!r} needs columns {list(preset.required_sources)}, "
            f"missing {missing} (columns: {names}); is {FORMAT_ENV_VAR} right?"
        )
    mapping = {
        canonical: lowered[source.lower()] for canonical, source in preset.columns.items() if source.lower() in lowered
    }
    used = {source.lower() for source in mapping.values()}
    attributes = [n for n in names if n.lower() not in used]
    clashes = [a for a in attributes if a.lower() in RESERVED_NAMES or a.lower() in CANONICAL_OPTIONAL]
    if clashes:
        raise EventSourceError(f"{where}: column names reserved by the pipeline: {clashes}")
    return mapping, attributes


def time_expression(text: str, unit: str) -> str:
    """SQL turning a VARCHAR time into a naive UTC TIMESTAMP, NULL when malformed.

    `auto` accepts ISO-8601 with or without a zone (no zone means UTC: the session runs in UTC)
    and plain epoch seconds; TRY() turns overflows into NULL so one absurd value cannot fail a run.
    """
    number = f"TRY_CAST({text} AS DOUBLE)"
    epoch_s = f"TRY(make_timestamp(CAST({number} * 1e6 AS BIGINT)))"
    epoch_ms = f"TRY(make_timestamp(CAST({number} * 1e3 AS BIGINT)))"
    if unit == "s":
        return epoch_s
    if unit == "ms":
        return epoch_ms
    return (
        f"CASE WHEN regexp_full_match({text}, '[+-]?[0-9]+(\\.[0-9]*)?') THEN {epoch_s} "
        f"ELSE TRY(CAST(timezone('UTC', TRY_CAST({text} AS TIMESTAMPTZ)) AS TIMESTAMP)) END"
    )


def _canonical_projection(
    preset: FormatPreset, mapping: dict[str, str], attributes: list[str], col, time_col_sql: str
) -> str:
    """SELECT list mapping source columns (via `col(name)` SQL) onto the staged columns."""

    def text(canonical: str) -> str:
        return col(mapping[canonical]) if canonical in mapping else "NULL::VARCHAR"

    category = f"nullif({text('category')}, '')"
    if preset.category_fallback and preset.category_fallback.lower() in {a.lower() for a in attributes}:
        fallback = next(a for a in attributes if a.lower() == preset.category_fallback.lower())
        category = f"coalesce({category}, nullif({col(fallback)}, ''))"
    items = [
        f"nullif(trim({text('user_id')}), '') AS user_id",
        time_col_sql,
        f"nullif(trim({text('event_name')}), '') AS event_name",
        f"nullif({text('item_id')}, '') AS item_id",
        f"{category} AS category",
        *[f"nullif({col(a)}, '') AS {quote_ident(a)}" for a in attributes],
    ]
    return ",\n       ".join(items)


def stage_csv(
    con: duckdb.DuckDBPyConnection,
    item: InputFile,
    ordinal: int,
    start: LineCursor = LineCursor(),
    limit_bytes: int | None = None,
) -> StagedInput:
    """Load the file's lines from `start` (up to `limit_bytes` of the file) into a temp table and
    return the staged relation over it."""
    preset = item.preset
    lines_table = f"_lines_{ordinal}"
    progress: dict = {}
    reader = pa.RecordBatchReader.from_batches(
        LINE_SCHEMA, iter_line_batches(item.path, start=start, limit_bytes=limit_bytes, progress=progress)
    )
    con.register("_line_stream", reader)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {lines_table} AS SELECT * FROM _line_stream")
    finally:
        con.unregister("_line_stream")

    first_data_row = 1
    if preset.has_header:
        header = first_line(item.path) if start.row > 1 else None
        if start.row <= 1:
            found = con.execute(f"SELECT line FROM {lines_table} WHERE source_row = 1").fetchall()
            header = found[0][0] if found else None
        if header is None:  # an empty file: nothing to read, nothing to map
            names = list(preset.columns.values())
        else:
            names = _parse_header(header)
        first_data_row = 2
    else:
        names = list(preset.header_columns)
    _check_names(names, item.source_file)
    mapping, attributes = _mapping(preset, names, item.source_file)
    rows_read = con.execute(f"SELECT count(*) FROM {lines_table} WHERE source_row >= {first_data_row}").fetchall()[0][0]

    position = {name: i + 1 for i, name in enumerate(names)}

    def col(name: str) -> str:
        return f"fields[{position[name]}]"

    event_time_text = f"nullif(trim({col(mapping['event_time'])}), '')"
    time_sql = (
        f"{event_time_text} AS event_time_text, {time_expression(event_time_text, preset.time_unit)} AS event_time"
    )
    n_fields = len(names)
    query = f"""
WITH decoded AS (
    SELECT source_row, unterminated, line,
           rtrim(TRY(decode(line)), chr(13)) AS text
    FROM {lines_table}
    WHERE source_row >= {first_data_row}
), split AS (
    SELECT *,
           contains(text, '"') AS quoted,
           CASE WHEN contains(text, '"')
                THEN regexp_extract_all(text || ',', {sql_literal(QUOTED_FIELD_RE)}, 1)
                ELSE string_split(text, ',') END AS pieces
    FROM decoded
), parsed AS (
    SELECT *,
           CASE WHEN quoted THEN list_transform(pieces, lambda p:
                    CASE WHEN length(p) >= 2 AND starts_with(p, '"') AND ends_with(p, '"')
                         THEN replace(p[2:-2], '""', '"') ELSE p END)
                ELSE pieces END AS fields
    FROM split
), checked AS (
    SELECT *,
           CASE WHEN text IS NULL THEN 'invalid_utf8'
                WHEN trim(text) = '' THEN 'blank_line'
                WHEN quoted AND list_sum(list_transform(pieces, lambda p: length(p) + 1))
                                <> length(text) + 1 THEN 'malformed_quoting'
                WHEN unterminated AND len(fields) < {n_fields} THEN 'truncated_row'
                WHEN len(fields) <> {n_fields} THEN 'wrong_column_count'
           END AS structural_reason
    FROM parsed
)
SELECT source_row,
       coalesce(text, CAST(line AS VARCHAR)) AS raw,
       structural_reason,
       {_canonical_projection(preset, mapping, attributes, col, time_sql)}
FROM checked
"""
    return StagedInput(
        source_file=item.source_file,
        query=query,
        attributes=attributes,
        rows_read=int(rows_read),
        preset=preset,
        temp_tables=[lines_table],
        end=progress.get("end", start),
    )


# ----------------------------------------------------------------------------------------------
# Parquet


def _parquet_time_sql(column: str, duck_type: str, unit: str) -> str:
    """(event_time_text, event_time) for a typed parquet column; text only where it is text."""
    ident = quote_ident(column)
    upper = duck_type.upper()
    if upper.startswith("TIMESTAMPTZ") or "WITH TIME ZONE" in upper:
        return f"NULL::VARCHAR AS event_time_text, CAST(timezone('UTC', {ident}) AS TIMESTAMP) AS event_time"
    if upper.startswith("TIMESTAMP") or upper == "DATE":
        return f"NULL::VARCHAR AS event_time_text, CAST({ident} AS TIMESTAMP) AS event_time"
    text = f"nullif(trim(CAST({ident} AS VARCHAR)), '')"
    return (
        f"{text} AS event_time_text, "
        f"{time_expression(text, 's' if unit == 'auto' and upper != 'VARCHAR' else unit)} "
        "AS event_time"
    )


def stage_parquet(con: duckdb.DuckDBPyConnection, item: InputFile, ordinal: int) -> StagedInput:
    """Stage a parquet file lazily: `raw` is left NULL (built from the staged values only for the
    rows that end up rejected), so accepted rows cost no JSON."""
    try:
        rows_read = pq.ParquetFile(item.path).metadata.num_rows
    except Exception as error:  # an unreadable file is a file-level error, reported clearly
        raise EventSourceError(f"{item.path}: not a readable parquet file ({error})") from error
    source = f"read_parquet({sql_literal(str(item.path))}, file_row_number = true)"
    described = con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
    types = {row[0]: row[1] for row in described if row[0] != "file_row_number"}
    names = list(types)
    _check_names(names, item.source_file)
    mapping, attributes = _mapping(item.preset, names, item.source_file)

    id_sources = {mapping[c] for c in ("user_id", "item_id") if c in mapping}

    def col(name: str) -> str:
        ident = quote_ident(name)
        if name in id_sources and types[name].upper() in ("FLOAT", "DOUBLE"):
            # pandas writes integer ids with gaps as floats: 7.0 is the id "7".
            return (
                f"CASE WHEN {ident} = trunc({ident}) AND abs({ident}) < 9e15 "
                f"THEN CAST(CAST({ident} AS BIGINT) AS VARCHAR) ELSE CAST({ident} AS VARCHAR) END"
            )
        return f"CAST({ident} AS VARCHAR)"

    time_sql = _parquet_time_sql(mapping["event_time"], types[mapping["event_time"]], item.preset.time_unit)
    query = f"""
SELECT file_row_number + 1 AS source_row,
       NULL::VARCHAR AS raw,
       NULL::VARCHAR AS structural_reason,
       {_canonical_projection(item.preset, mapping, attributes, col, time_sql)}
FROM {source}
"""
    return StagedInput(
        source_file=item.source_file,
        query=query,
        attributes=attributes,
        rows_read=int(rows_read),
        preset=item.preset,
    )


def stage_file(
    con: duckdb.DuckDBPyConnection,
    item: InputFile,
    ordinal: int,
    start: LineCursor = LineCursor(),
    limit_bytes: int | None = None,
) -> StagedInput:
    """Stage one file; a CSV read resumes at `start` and stops at `limit_bytes` of the file."""
    if item.kind == "parquet":
        return stage_parquet(con, item, ordinal)
    return stage_csv(con, item, ordinal, start, limit_bytes)


# ----------------------------------------------------------------------------------------------
# The resource


class EventSource(dg.ConfigurableResource):
    """Where raw events come from: files named by `TRACE_DAGSTER_EVENTS`, else the simulator.

    Fields left empty are read from the environment when used (both variables are optional, and
    an unset `EnvVar` would be a load error). The simulator's output is written once per
    configuration as parquet under the home and then ingested like any file, so the simulated
    and the real path share every line of validation code.
    """

    paths: TraceDagsterPaths
    events: str = Field(default="", description="File, folder or glob; empty means $TRACE_DAGSTER_EVENTS.")
    events_format: str = Field(default="", description="canonical, taobao, rees46 or retailrocket; empty means env.")
    simulator_n_users: int = 2000
    simulator_days: int = 35  # the simulator task set's three weekly cutoffs, each with 14 days of labels
    simulator_seed: int = 0
    simulator_start_date: str = "2026-01-05"

    @property
    def events_spec(self) -> str:
        return self.events or os.environ.get(EVENTS_ENV_VAR, "")

    @property
    def preset(self) -> FormatPreset:
        return get_format(self.events_format or os.environ.get(FORMAT_ENV_VAR) or "canonical")

    @property
    def uses_simulator(self) -> bool:
        return not self.events_spec.strip()

    def simulator_config(self):
        from resources.event_sources.simulator import SimulatorConfig

        return SimulatorConfig(
            n_users=self.simulator_n_users,
            days=self.simulator_days,
            seed=self.simulator_seed,
            start_date=self.simulator_start_date,
        )

    def simulated_file_name(self) -> str:
        """The simulator's file for this configuration (also its partition key): no generation."""
        return (
            f"simulated_events_n_users={self.simulator_n_users}_days={self.simulator_days}"
            f"_seed={self.simulator_seed}_start={self.simulator_start_date}.parquet"
        )

    def simulated_file(self) -> Path:
        """The simulator's output for this configuration, generated on first use (atomically)."""
        from resources.event_sources.simulator import write_simulated_parquet

        name = self.simulated_file_name()
        path = self.paths.simulated_dir / name
        if not path.exists():
            tmp = path.with_name(f".tmp-{os.getpid()}-{name}")
            write_simulated_parquet(self.simulator_config(), str(tmp))
            tmp.rename(path)
        return path

    def describe(self) -> str:
        if self.uses_simulator:
            return (
                f"simulator (n_users={self.simulator_n_users}, days={self.simulator_days}, "
                f"seed={self.simulator_seed}, start_date={self.simulator_start_date})"
            )
        return f"{self.events_spec} (format {self.preset.name})"

    def events_root(self) -> Path:
        """The folder that partition keys are relative to: the simulator's folder, the folder
        named by TRACE_DAGSTER_EVENTS, a file's parent, or a glob's fixed leading folders."""
        if self.uses_simulator:
            return self.paths.simulated_dir.resolve()
        return events_root(self.events_spec)

    def file_key(self, path: Path) -> str:
        """The stable partition key of an input file (see `partition_key_for`)."""
        return partition_key_for(path, self.events_root())

    def list_inputs(self) -> tuple[list[InputFile], list[Path]]:
        """(input files to consider, ignored files found next to them)."""
        if self.uses_simulator:
            return [InputFile(self.simulated_file(), "parquet", get_format("canonical"))], []
        preset = self.preset
        readable, ignored = expand_inputs(self.events_spec)
        return [InputFile(p, file_kind(p) or "csv", preset) for p in readable], ignored
