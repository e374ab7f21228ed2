"""`raw_events` and `rejected_events`: every input row lands in exactly one of them.

One step writes both tables and the ingestion log `ingested_files` in one transaction, so the
contract's reconciliation (rows read = accepted + rejected, per run) holds at every commit, and
the asset checks below verify it from the committed tables.

Incremental and idempotent, for files that grow. Each read of a file is logged with the file's
size and the SHA-256 of those bytes, and (CSV) the cursor just past the last newline read. On the
next run a file is
- `unchanged` (same size and hash): skipped;
- `appended` (longer, and its first `size_bytes` bytes still hash to the logged digest): read only
  from the cursor, so the new rows' `source_row` continues the old numbering;
- `rewritten` (its prefix changed: truncated, rotated, rewritten; or a parquet file changed): read
  again in full as a new `version`; its rows identical to rows accepted from earlier versions of
  the same file are rejected as `overlap`, which is bookkeeping, not bad input;
- `new`.

Rejection reasons (first that applies): `invalid_utf8`, `blank_line`, `malformed_quoting`,
`truncated_row` (last line cut short), `wrong_column_count`, `missing_user_id`,
`malformed_user_id`, `missing_event_time`, `malformed_event_time`, `event_time_out_of_range`,
`missing_event_name`, `unknown_event_name` (presets with a fixed vocabulary),
`malformed_event_name`, then `overlap` (same values as a row accepted earlier from the same
file: a rewritten file's old rows, or a line re-read because it had no newline yet) and
`duplicate` (same values as an earlier row of this run's input, or as a row accepted earlier
from another file; the first is kept). Only the rows of the latter kinds are bad input: the
rejected-share check leaves `overlap` out.

Plausible time range: by default [1995-01-01, now + 1 day]. That range catches corrupt values
(epoch 0, milliseconds read as seconds, far future), not dataset-specific noise: the Taobao
slices' 39 events dated back to 2017-09-11 are real rows with a plausible date, so they are
accepted; set `min_event_time: "2017-11-25"` in the run config to quarantine them instead.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatch

import dagster as dg
import duckdb
import pandas as pd
from pydantic import Field

from assets.common.metadata import markdown_table, warehouse_table_metadata
from assets.ingestion.columns import RAW_EVENTS_COLUMNS, REJECTED_EVENTS_COLUMNS
from assets.ingestion.partitions import EVENT_FILES
from resources.event_sources import (
    CANONICAL_KEYS,
    CANONICAL_OPTIONAL,
    EventSource,
    InputFile,
    LineCursor,
    StagedInput,
    prefix_hashes,
    stage_file,
)
from resources.warehouse import (
    PARQUET_CATALOG,
    WAREHOUSE_POOL,
    DuckDBWarehouse,
    quote_ident,
    sql_literal,
    table_exists,
    utc_now,
)

RAW_EVENTS = "raw_events"
REJECTED_EVENTS = "rejected_events"
INGESTED_FILES = "ingested_files"
VALUE_COLUMNS = (*CANONICAL_KEYS, *CANONICAL_OPTIONAL)
PROVENANCE_COLUMNS = ("source_file", "source_row", "ingested_at")

INGESTED_FILES_DDL = f"""
CREATE TABLE IF NOT EXISTS {INGESTED_FILES} (
    source_file   VARCHAR   NOT NULL,
    content_hash  VARCHAR   NOT NULL,
    size_bytes    BIGINT    NOT NULL,
    mtime_ns      BIGINT    NOT NULL,
    events_format VARCHAR   NOT NULL,
    rows_read     BIGINT    NOT NULL,
    rows_accepted BIGINT    NOT NULL,
    rows_rejected BIGINT    NOT NULL,
    ingested_at   TIMESTAMP NOT NULL,
    run_id        VARCHAR
)
"""
# Columns added for files that grow (issue 15); ALTERed into warehouses made before them. A row
# without a cursor (older warehouses, parquet) can only be followed by a full re-read.
INGESTED_FILES_COLUMNS = (
    ("read_kind", "VARCHAR", "'new'"),  # new, appended or rewritten
    ("file_version", "INTEGER", "1"),  # +1 at every rewrite of the same path
    ("start_row", "BIGINT", "1"),  # first line (row) number read by this run
    ("end_offset", "BIGINT", "NULL"),  # decompressed bytes through the last newline read
    ("end_row", "BIGINT", "NULL"),  # the line number that starts at end_offset
    ("rows_overlap", "BIGINT", "0"),  # rejected as `overlap`: read before, not bad input
)

NOT_BAD_INPUT = ("overlap",)


def ensure_ingested_files(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(INGESTED_FILES_DDL)
    for name, sql_type, default in INGESTED_FILES_COLUMNS:
        con.execute(f"ALTER TABLE {INGESTED_FILES} ADD COLUMN IF NOT EXISTS {name} {sql_type} DEFAULT {default}")


class IngestionConfig(dg.Config):
    """Validation settings of one ingestion run."""

    min_event_time: str = "1995-01-01"
    max_future_seconds: int = 86_400
    compact_above_parts: int = 8  # merge the small parquet parts of a table once it has more
    only_files: list[str] = Field(
        default_factory=list,
        description="Ingest only the input files matching one of these globs (full path or file "
        "name), e.g. to re-run one file's ingestion alone; empty means every input file.",
    )


def select_files(inputs: list[InputFile], patterns: list[str]) -> list[InputFile]:
    """The inputs whose full path or file name matches one of `patterns` (all when empty)."""
    if not patterns:
        return inputs
    return [
        item for item in inputs if any(fnmatch(item.source_file, p) or fnmatch(item.path.name, p) for p in patterns)
    ]


@dataclass
class FileRead:
    """What one run reads of one file, decided before reading (see `plan_reads`)."""

    item: InputFile
    read_kind: str  # new, appended, rewritten
    version: int
    digest: str  # SHA-256 of the first size_bytes bytes
    size_bytes: int
    mtime_ns: int
    start: LineCursor = field(default_factory=LineCursor)
    note: str = ""


@dataclass
class FileOutcome:
    source_file: str
    read_kind: str
    version: int
    start_row: int
    rows_read: int
    rows_accepted: int
    rows_rejected: int
    rows_overlap: int
    note: str

    def metadata(self) -> dict:
        """What the read did, as asset metadata (per-file observations, per-partition materializations)."""
        return {
            "read": self.read_kind,
            "file_version": self.version,
            "from_row": self.start_row,
            "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "rows_overlap": self.rows_overlap,
            **({"reason": self.note} if self.note else {}),
        }


@dataclass
class IngestionSummary:
    ingested_at: datetime | None
    new_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    rows_overlap: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    files: list[FileOutcome] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return [f.note for f in self.files if f.note]


def _columns_of(con: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]


def _reason_sql(staged: StagedInput, min_time: str, max_time: str) -> str:
    """The first failing rule for a staged row, NULL when it is accepted (before duplicates)."""
    preset = staged.preset
    if preset.numeric_ids:
        bad_user = "NOT regexp_full_match(user_id, '[0-9]+')"
    else:
        bad_user = "regexp_matches(user_id, '[[:cntrl:]]')"
    if preset.event_names is not None:
        names = ", ".join(sql_literal(n) for n in sorted(preset.event_names))
        bad_name = f"WHEN event_name NOT IN ({names}) THEN 'unknown_event_name'"
    else:
        bad_name = "WHEN regexp_matches(event_name, '[[:cntrl:]]') THEN 'malformed_event_name'"
    return f"""CASE
        WHEN structural_reason IS NOT NULL THEN structural_reason
        WHEN user_id IS NULL THEN 'missing_user_id'
        WHEN {bad_user} THEN 'malformed_user_id'
        WHEN event_time IS NULL AND event_time_text IS NULL THEN 'missing_event_time'
        WHEN event_time IS NULL THEN 'malformed_event_time'
        WHEN event_time < TIMESTAMP {sql_literal(min_time)}
          OR event_time > TIMESTAMP {sql_literal(max_time)} THEN 'event_time_out_of_range'
        WHEN event_name IS NULL THEN 'missing_event_name'
        {bad_name}
    END"""


def plan_reads(con: duckdb.DuckDBPyConnection, inputs: list[InputFile]) -> tuple[list[FileRead], list[str]]:
    """Decide, per input file, whether and from where to read it; returns (reads, unchanged).

    Compared with the latest logged read of the same path: same size and mtime means unchanged
    without hashing; otherwise one pass hashes the file and, if it grew, the logged prefix.
    """
    latest = {
        row[0]: row[1:]
        for row in con.execute(
            f"""SELECT source_file, content_hash, size_bytes, mtime_ns, file_version, end_offset, end_row
                FROM {INGESTED_FILES}
                QUALIFY row_number() OVER (PARTITION BY source_file ORDER BY ingested_at DESC) = 1"""
        ).fetchall()
    }
    reads, unchanged = [], []
    for item in inputs:
        stat = item.path.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
        previous = latest.get(item.source_file)
        if previous is None:
            digest, _ = prefix_hashes(item.path, size, None)
            reads.append(FileRead(item, "new", 1, digest, size, mtime))
            continue
        old_digest, old_size, old_mtime, old_version, end_offset, end_row = previous
        if (size, mtime) == (old_size, old_mtime):
            unchanged.append(item.source_file)
            continue
        grew = size > old_size and end_offset is not None and item.kind == "csv"
        digest, prefix = prefix_hashes(item.path, size, old_size if grew else None)
        if digest == old_digest:  # touched, not changed
            unchanged.append(item.source_file)
        elif grew and prefix == old_digest:
            start = LineCursor(int(end_offset), int(end_row))
            reads.append(FileRead(item, "appended", old_version, digest, size, mtime, start))
        else:
            if item.kind == "parquet":
                why = "a parquet file is read in full"
            else:
                why = "shorter" if size < old_size else "its first bytes changed" if size > old_size else "same size"
            note = (
                f"{item.source_file} was rewritten ({why}; {old_size:,} -> {size:,} bytes): "
                f"read again in full as version {old_version + 1}; rows accepted from earlier "
                "versions are rejected as `overlap`"
            )
            reads.append(FileRead(item, "rewritten", old_version + 1, digest, size, mtime, note=note))
    return reads, unchanged


def ingest(
    warehouse: DuckDBWarehouse,
    con: duckdb.DuckDBPyConnection,
    inputs: list[InputFile],
    config: IngestionConfig | None = None,
    run_id: str | None = None,
) -> IngestionSummary:
    """Read the new files among `inputs` into `raw_events` / `rejected_events` atomically."""
    config = config or IngestionConfig()
    ensure_ingested_files(con)
    new, skipped = plan_reads(con, inputs)
    summary = IngestionSummary(ingested_at=None, skipped_files=skipped)
    if not new:
        return summary

    ingested_at = utc_now()
    summary.ingested_at = ingested_at
    min_ts = pd.Timestamp(config.min_event_time)
    if min_ts.tzinfo is not None:  # the warehouse compares naive UTC timestamps
        min_ts = min_ts.tz_convert("UTC").tz_localize(None)
    min_time = min_ts.strftime("%Y-%m-%d %H:%M:%S.%f")
    max_time = (ingested_at + timedelta(seconds=config.max_future_seconds)).strftime("%Y-%m-%d %H:%M:%S.%f")
    staged_inputs = [
        stage_file(con, read.item, ordinal, read.start, read.size_bytes) for ordinal, read in enumerate(new)
    ]
    try:
        attributes: list[str] = []
        for staged in staged_inputs:
            attributes += [a for a in staged.attributes if a not in attributes]
        candidates = "\nUNION ALL BY NAME\n".join(
            f"SELECT {ordinal} AS file_ord, {sql_literal(staged.source_file)} AS source_file, "
            f"*, {_reason_sql(staged, min_time, max_time)} AS reason FROM ({staged.query})"
            for ordinal, staged in enumerate(staged_inputs)
        )
        # Exact repeats: the same values as an accepted row that comes earlier, in this run
        # (file order, then row) or in the table already (those rank first). A repeat of a row
        # accepted earlier from the same file is `overlap` (read before), any other `duplicate`.
        # A 64-bit hash of the values finds the few suspects cheaply; the exact comparison runs
        # on those only, so a hash collision can never reject a distinct row.
        value_columns = [*VALUE_COLUMNS, *attributes]
        existing: set[str] = set()
        if table_exists(con, RAW_EVENTS):
            existing = set(_columns_of(con, RAW_EVENTS))
            value_columns += sorted(c for c in existing if c not in value_columns and c not in PROVENANCE_COLUMNS)

        def values_of(available: set[str]) -> str:
            return ", ".join(
                quote_ident(c)
                if c in available
                else f"NULL::{'TIMESTAMP' if c == 'event_time' else 'VARCHAR'} AS {quote_ident(c)}"
                for c in value_columns
            )

        def hash_of(available: set[str]) -> str:
            return (
                "hash(" + ", ".join(quote_ident(c) if c in available else "NULL::VARCHAR" for c in value_columns) + ")"
            )

        batch_columns = {*VALUE_COLUMNS, *attributes}
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _checked AS "
            f"SELECT *, {hash_of(batch_columns)} AS row_hash FROM ({candidates})"
        )
        prior = f"SELECT NULL::UBIGINT AS row_hash, {values_of(set())}, NULL::VARCHAR AS source_file WHERE false"
        if existing:
            prior = (
                f"SELECT {hash_of(existing)} AS row_hash, {values_of(existing)}, source_file "
                f"FROM {RAW_EVENTS} WHERE user_id IN "
                "(SELECT user_id FROM _checked WHERE reason IS NULL)"
            )
        partition = ", ".join(quote_ident(c) for c in value_columns)
        con.execute(
            f"""
CREATE OR REPLACE TEMP TABLE _duplicates AS
WITH prior AS ({prior}),
suspects AS (
    SELECT row_hash FROM (
        SELECT row_hash FROM _checked WHERE reason IS NULL
        UNION ALL SELECT row_hash FROM prior)
    GROUP BY row_hash HAVING count(*) > 1
), ranked AS (
    SELECT file_ord, source_row, is_prior,
           row_number() OVER (PARTITION BY {partition}
                              ORDER BY is_prior DESC, file_ord, source_row) AS duplicate_rank,
           bool_or(is_prior) OVER (PARTITION BY {partition}, source_file) AS read_before
    FROM (
        SELECT {values_of(batch_columns)}, file_ord, source_row, source_file, false AS is_prior
        FROM _checked WHERE reason IS NULL AND row_hash IN (SELECT row_hash FROM suspects)
        UNION ALL
        SELECT {values_of(set(value_columns))}, -1 AS file_ord, 0::BIGINT AS source_row,
               source_file, true AS is_prior
        FROM prior WHERE row_hash IN (SELECT row_hash FROM suspects)
    )
)
SELECT file_ord, source_row, CASE WHEN read_before THEN 'overlap' ELSE 'duplicate' END AS reason
FROM ranked WHERE NOT is_prior AND duplicate_rank > 1
"""
        )
        con.execute(
            "UPDATE _checked SET reason = d.reason FROM _duplicates d "
            "WHERE _checked.file_ord = d.file_ord AND _checked.source_row = d.source_row"
        )

        attribute_list = "".join(f", {quote_ident(a)}" for a in attributes)
        ingested_literal = f"TIMESTAMP {sql_literal(ingested_at.isoformat(sep=' '))}"
        accepted_sql = (
            f"SELECT user_id, CAST(event_time AS TIMESTAMP) AS event_time, event_name, "
            f"item_id, category{attribute_list}, source_file, source_row, "
            f"{ingested_literal} AS ingested_at FROM _checked WHERE reason IS NULL"
        )
        raw_json = ", ".join(
            [
                "user_id := user_id",
                "event_time := coalesce(event_time_text, CAST(event_time AS VARCHAR))",
                "event_name := event_name",
                "item_id := item_id",
                "category := category",
                *[f"{quote_ident(a)} := {quote_ident(a)}" for a in attributes],
            ]
        )
        rejected_sql = (
            "SELECT source_file, source_row, "
            f"coalesce(raw, CAST(to_json(struct_pack({raw_json})) AS VARCHAR)) AS raw, reason, "
            f"{ingested_literal} AS ingested_at FROM _checked WHERE reason IS NOT NULL "
            "ORDER BY file_ord, source_row"
        )
        raw_part = warehouse.write_parquet(con, RAW_EVENTS, accepted_sql)
        rejected_part = warehouse.write_parquet(con, REJECTED_EVENTS, rejected_sql)

        counts = {
            row[0]: (row[1], row[2], row[3])
            for row in con.execute(
                "SELECT file_ord, count(*) FILTER (reason IS NULL), "
                "count(*) FILTER (reason IS NOT NULL), count(*) FILTER (reason = 'overlap') "
                "FROM _checked GROUP BY file_ord"
            ).fetchall()
        }
        summary.rejected_by_reason = dict(
            con.execute(
                "SELECT reason, count(*) FROM _checked WHERE reason IS NOT NULL "
                "GROUP BY reason ORDER BY count(*) DESC, reason"
            ).fetchall()
        )
        # The tables and their bookkeeping rows commit together, or not at all.
        with warehouse.publish(con, {RAW_EVENTS: [raw_part], REJECTED_EVENTS: [rejected_part]}, replace=False):
            for ordinal, (read, staged) in enumerate(zip(new, staged_inputs)):
                accepted, rejected, overlap = counts.get(ordinal, (0, 0, 0))
                end = staged.end
                con.execute(
                    f"INSERT INTO {INGESTED_FILES} (source_file, content_hash, size_bytes, mtime_ns, "
                    "events_format, rows_read, rows_accepted, rows_rejected, ingested_at, run_id, "
                    "read_kind, file_version, start_row, end_offset, end_row, rows_overlap) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        read.item.source_file,
                        read.digest,
                        read.size_bytes,
                        read.mtime_ns,
                        read.item.preset.name,
                        staged.rows_read,
                        accepted,
                        rejected,
                        ingested_at,
                        run_id,
                        read.read_kind,
                        read.version,
                        read.start.row,
                        end.offset if end else None,
                        end.row if end else None,
                        overlap,
                    ],
                )
                summary.new_files.append(read.item.source_file)
                summary.files.append(
                    FileOutcome(
                        read.item.source_file,
                        read.read_kind,
                        read.version,
                        read.start.row,
                        staged.rows_read,
                        accepted,
                        rejected,
                        overlap,
                        read.note,
                    )
                )
                summary.rows_read += staged.rows_read
                summary.rows_accepted += accepted
                summary.rows_rejected += rejected
                summary.rows_overlap += overlap
    finally:
        for staged in staged_inputs:
            for table in staged.temp_tables:
                con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute("DROP TABLE IF EXISTS _duplicates")
        con.execute("DROP TABLE IF EXISTS _checked")
    return summary


def compact_parts(
    warehouse: DuckDBWarehouse,
    con: duckdb.DuckDBPyConnection,
    table: str,
    max_parts: int = 8,
    small_part_rows: int = 5_000_000,
) -> int:
    """Merge the small parquet parts of an append-only table once it has more than `max_parts`.

    Every ingestion adds one part per table; a folder fed every few minutes would leave thousands
    of tiny files (slow scans, one file handle each). The parts below `small_part_rows` are
    rewritten as one file and swapped in atomically; rows and their order keys are unchanged.
    Returns the number of parts merged (0: nothing to do).
    """
    parts = con.execute(
        f"SELECT path, row_count FROM {PARQUET_CATALOG} WHERE table_name = ? ORDER BY written_at, path", [table]
    ).fetchall()
    small = [path for path, rows in parts if rows is not None and rows < small_part_rows]
    if len(parts) <= max_parts or len(small) < 2:
        return 0
    listed = "[" + ", ".join(sql_literal(p) for p in small) + "]"
    merged = warehouse.write_parquet(con, table, f"SELECT * FROM read_parquet({listed}, union_by_name = true)")
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"DELETE FROM {PARQUET_CATALOG} WHERE table_name = ? AND list_contains(?, path)", [table, small])
        warehouse.register_parquet(con, table, [merged], replace=False)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    warehouse.sweep_unreferenced(con, table)
    return len(small)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            RAW_EVENTS,
            group_name="ingestion",
            owners=["team:data-platform"],
            kinds={"duckdb", "parquet"},
            description="Accepted input events in the canonical format, with source_file, "
            "source_row (1-based) and ingested_at.",
        ),
        dg.AssetSpec(
            REJECTED_EVENTS,
            group_name="ingestion",
            owners=["team:data-platform"],
            kinds={"duckdb", "parquet"},
            description="Input rows that were not accepted: source_file, source_row, raw, reason.",
        ),
    ],
    pool=WAREHOUSE_POOL,
    partitions_def=EVENT_FILES,
    # A backfill of many files (a first load of thousands) is one run reading them together,
    # which gives the same tables as one run per file in key order (see `ingest`).
    backfill_policy=dg.BackfillPolicy.single_run(),
)
def ingested_events(
    context: dg.AssetExecutionContext,
    config: IngestionConfig,
    warehouse: DuckDBWarehouse,
    event_source: EventSource,
):
    """Validate the event source's new files into raw_events / rejected_events.

    A partitioned run (one `event_files` key, a range, a single-run backfill) reads exactly the
    files of its keys; a run without a partition (a bare `materialize()` or a launch without
    one) reads every input file. Either way the ledger skips what is already ingested.
    """
    inputs, ignored = event_source.list_inputs()
    keys = {item.source_file: event_source.file_key(item.path) for item in inputs}
    partitioned = context.has_partition_key or context.has_partition_key_range
    requested: list[str] = list(context.partition_keys) if partitioned else []
    missing: list[str] = []
    if partitioned:
        wanted = set(requested)
        missing = sorted(wanted - set(keys.values()))
        inputs = [item for item in inputs if keys[item.source_file] in wanted]  # input order
        if missing:
            where = f"{event_source.describe()}, root {event_source.events_root()}"
            if not inputs:
                raise dg.Failure(
                    f"no input file for partition(s) {', '.join(missing[:10])} of event_files in {where}: "
                    "the file was moved or deleted (rows ingested from it earlier stay in raw_events); "
                    "restore it, or delete the partition (the new_event_files sensor removes the partitions of "
                    "files it saw deleted)",
                    metadata={"missing_partitions": dg.MetadataValue.md("\n".join(f"- `{k}`" for k in missing))},
                )
            context.log.warning(
                f"{len(missing)} of {len(requested)} partition(s) have no input file in {where}, "
                f"skipped: {', '.join(missing[:10])}"
            )
    if config.only_files:
        chosen = select_files(inputs, config.only_files)
        context.log.info(f"only_files {config.only_files}: {len(chosen)} of {len(inputs)} input files")
        inputs = chosen
    with warehouse.connect() as con:
        summary = ingest(warehouse, con, inputs, config, run_id=context.run.run_id)
        for note in summary.notes:
            context.log.warning(note)
        for read in summary.files:  # one observation per file read: its history in the asset's UI
            context.log_event(
                dg.AssetObservation(
                    asset_key=RAW_EVENTS,
                    partition=keys[read.source_file] if partitioned else None,
                    metadata={"source_file": read.source_file, **read.metadata()},
                )
            )
        if summary.new_files:
            context.log.info(
                f"ingested {len(summary.new_files)} file(s): {summary.rows_read} rows read, "
                f"{summary.rows_accepted} accepted, {summary.rows_rejected} rejected "
                f"({summary.rows_overlap} of them `overlap`: read before)"
            )
        else:
            context.log.info(f"no new input among {len(inputs)} file(s): tables unchanged")
        compacted = {
            table: compact_parts(warehouse, con, table, max_parts=config.compact_above_parts)
            for table in (RAW_EVENTS, REJECTED_EVENTS)
        }
        for table, merged in compacted.items():
            if merged:
                context.log.info(f"{table}: {merged} small parquet parts compacted into one")
        parquet_parts = dict(
            con.execute(
                f"SELECT table_name, count(*) FROM {PARQUET_CATALOG} WHERE table_name IN (?, ?) GROUP BY 1",
                [RAW_EVENTS, REJECTED_EVENTS],
            ).fetchall()
        )
        has_tables = table_exists(con, RAW_EVENTS)
        raw_total, users = (
            con.execute(f"SELECT count(*), count(DISTINCT user_id) FROM {RAW_EVENTS}").fetchall()[0]
            if has_tables
            else (0, 0)
        )
        rejected_total = con.execute(f"SELECT count(*) FROM {REJECTED_EVENTS}").fetchall()[0][0] if has_tables else 0
        if partitioned:
            selected = {item.source_file for item in inputs}
            per_partition_metadata(context, con, summary, keys, requested, missing, selected, has_tables)
        run_filter = (
            f"WHERE ingested_at = TIMESTAMP {sql_literal(summary.ingested_at.isoformat(sep=' '))}"
            if summary.ingested_at
            else "WHERE false"
        )
        raw_catalog = (
            warehouse_table_metadata(
                con,
                RAW_EVENTS,
                RAW_EVENTS_COLUMNS,
                preview_rows=5,
                preview_sql=f"SELECT * FROM {RAW_EVENTS} {run_filter} LIMIT 5",
            )
            if has_tables
            else {}
        )
        rejected_catalog = warehouse_table_metadata(con, REJECTED_EVENTS, REJECTED_EVENTS_COLUMNS) if has_tables else {}
        rejected_preview = (
            con.execute(
                f"SELECT source_file, source_row, reason, raw FROM {REJECTED_EVENTS} "
                f"{run_filter} ORDER BY source_file, source_row LIMIT 10"
            ).df()
            if has_tables
            else pd.DataFrame()
        )
    by_reason = pd.DataFrame(list(summary.rejected_by_reason.items()), columns=["reason", "rows"])
    files_read = pd.DataFrame(
        [
            (f.source_file, f.read_kind, f.version, f.start_row, f.rows_read, f.rows_accepted, f.rows_rejected)
            for f in summary.files
        ],
        columns=["file", "read", "version", "from_row", "rows_read", "accepted", "rejected"],
    )
    common = {
        "source": event_source.describe(),
        "new_files": dg.MetadataValue.md("\n".join(f"- `{f}`" for f in summary.new_files) or "_(none)_"),
        "files_read": dg.MetadataValue.md(markdown_table(files_read, max_rows=50)),
        "files_appended": sum(f.read_kind == "appended" for f in summary.files),
        "files_rewritten": sum(f.read_kind == "rewritten" for f in summary.files),
        "rewrites": dg.MetadataValue.md("\n".join(f"- {n}" for n in summary.notes) or "_(none)_"),
        "files_already_ingested": len(summary.skipped_files),
        "ignored_files": dg.MetadataValue.md("\n".join(f"- `{p}`" for p in ignored) or "_(none)_"),
        "rows_read_this_run": summary.rows_read,
        "rows_overlap_this_run": summary.rows_overlap,
    }
    yield dg.MaterializeResult(
        asset_key=RAW_EVENTS,
        metadata={
            **raw_catalog,  # column schema, preview (this run's rows) as a table
            **common,
            "dagster/row_count": int(raw_total),  # per partition: the file's rows (per_partition_metadata)
            "table_rows": int(raw_total),
            "rows_added": summary.rows_accepted,
            "parquet_parts": int(parquet_parts.get(RAW_EVENTS, 0)),
            "parts_compacted": compacted[RAW_EVENTS],
            "users": int(users),
        },
    )
    yield dg.MaterializeResult(
        asset_key=REJECTED_EVENTS,
        metadata={
            **rejected_catalog,
            **common,
            "dagster/row_count": int(rejected_total),
            "table_rows": int(rejected_total),
            "rows_added": summary.rows_rejected,
            "parquet_parts": int(parquet_parts.get(REJECTED_EVENTS, 0)),
            "parts_compacted": compacted[REJECTED_EVENTS],
            "rejected_by_reason": dg.MetadataValue.md(markdown_table(by_reason, max_rows=50)),
            "preview": dg.MetadataValue.md(markdown_table(rejected_preview)),
        },
    )


def per_partition_metadata(
    context: dg.AssetExecutionContext,
    con: duckdb.DuckDBPyConnection,
    summary: IngestionSummary,
    keys: dict[str, str],
    requested: list[str],
    missing: list[str],
    selected: set[str],
    has_tables: bool,
) -> None:
    """What this run did to each partition's file, on that partition's materialization of both
    tables: the read (new, appended, rewritten, unchanged or missing), its row counts, and the
    rows the file holds in each table (`dagster/row_count` of the partition)."""
    files = {key: source for source, key in keys.items()}
    totals: dict[str, dict[str, int]] = {RAW_EVENTS: {}, REJECTED_EVENTS: {}}
    if has_tables and requested:
        listed = [files[k] for k in requested if k in files]
        for table in totals:
            totals[table] = dict(
                con.execute(
                    f"SELECT source_file, count(*) FROM {table} WHERE list_contains(?, source_file) GROUP BY 1",
                    [listed],
                ).fetchall()
            )
    outcomes = {f.source_file: f for f in summary.files}
    for key in requested:
        source = files.get(key)
        outcome = outcomes.get(source) if source else None
        if key in missing:
            read = {"read": "missing", "reason": "no such input file now: nothing read"}
        elif source not in selected:
            read = {"read": "not_selected", "reason": "left out by the only_files config: nothing read"}
        elif outcome is None:
            read = {"read": "unchanged", "rows_read": 0, "rows_accepted": 0, "rows_rejected": 0}
        else:
            read = outcome.metadata()
        for table in totals:
            context.add_asset_metadata(
                {
                    **({"source_file": source} if source else {}),
                    **read,
                    "dagster/row_count": int(totals[table].get(source, 0)),
                },
                asset_key=table,
                partition_key=key,
            )


# ----------------------------------------------------------------------------------------------
# Checks: computed from the committed tables, not from what the asset believes it wrote.


class IngestionCheckConfig(dg.Config):
    max_rejected_share: float = 0.05


def check_reconciliation(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    """rows_read (counted while reading) = accepted + rejected rows in the tables, per file and run."""
    mismatches = con.execute(
        f"""
WITH accepted AS (
    SELECT source_file, ingested_at, count(*) AS n FROM {RAW_EVENTS} GROUP BY ALL
), rejected AS (
    SELECT source_file, ingested_at, count(*) AS n FROM {REJECTED_EVENTS} GROUP BY ALL
)
SELECT f.source_file, f.ingested_at, f.rows_read,
       coalesce(a.n, 0) AS in_raw_events, coalesce(r.n, 0) AS in_rejected_events
FROM {INGESTED_FILES} f
LEFT JOIN accepted a USING (source_file, ingested_at)
LEFT JOIN rejected r USING (source_file, ingested_at)
WHERE f.rows_read <> coalesce(a.n, 0) + coalesce(r.n, 0)
ORDER BY f.ingested_at, f.source_file
"""
    ).df()
    (files,) = con.execute(f"SELECT count(*) FROM {INGESTED_FILES}").fetchall()[0]
    metadata = {
        "file_reads_checked": int(files),
        "mismatches": dg.MetadataValue.md(markdown_table(mismatches)),
    }
    if not mismatches.empty:
        first = mismatches.iloc[0]
        metadata["reason"] = (
            f"{len(mismatches)} file read(s) do not reconcile, e.g. {first.source_file} at "
            f"{first.ingested_at}: {first.rows_read} read, {first.in_raw_events} accepted + "
            f"{first.in_rejected_events} rejected"
        )
    return dg.AssetCheckResult(
        check_name="rows_reconcile", asset_key=RAW_EVENTS, passed=mismatches.empty, metadata=metadata
    )


def check_rejected_share(
    con: duckdb.DuckDBPyConnection, max_rejected_share: float, run_id: str | None
) -> dg.AssetCheckResult:
    """A high share of bad rows among the rows this run read usually means a wrong format setting.

    `overlap` rows (read before, from the same file) are bookkeeping, not bad input: they are
    left out of both sides of the share. A run that read nothing has nothing to judge: it passes
    and says so, rather than judging an earlier run again.
    """
    read, rejected, overlap, files = con.execute(
        f"SELECT coalesce(sum(rows_read), 0), coalesce(sum(rows_rejected), 0), "
        f"coalesce(sum(rows_overlap), 0), count(*) FROM {INGESTED_FILES} WHERE run_id = ?",
        [run_id],
    ).fetchall()[0]
    judged = read - overlap
    bad = rejected - overlap
    share = bad / judged if judged else 0.0
    passed = share <= max_rejected_share
    metadata = {
        "files_read_this_run": int(files),
        "rows_read_this_run": int(read),
        "rows_rejected_this_run": int(rejected),
        "rows_overlap_this_run": int(overlap),
        "rejected_share": float(share),
        "max_rejected_share": max_rejected_share,
    }
    if not files:
        metadata["reason"] = "no new input in this run: nothing to judge, tables unchanged"
    elif not judged:
        metadata["reason"] = f"all {read} rows read this run were read before (overlap): no bad input"
    elif not passed:
        metadata["reason"] = (
            f"{bad} of {judged} rows read this run were rejected ({share:.1%} > {max_rejected_share:.1%}): "
            "see rejected_events for this run's reasons; a wrong TRACE_DAGSTER_EVENTS_FORMAT?"
        )
    return dg.AssetCheckResult(
        check_name="rejected_share_below_threshold", asset_key=RAW_EVENTS, passed=passed, metadata=metadata
    )


def check_raw_keys_not_null(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    nulls = con.execute(
        f"SELECT count(*) FILTER (user_id IS NULL), count(*) FILTER (event_time IS NULL), "
        f"count(*) FILTER (event_name IS NULL), count(*) FILTER (source_file IS NULL "
        f"OR source_row IS NULL) FROM {RAW_EVENTS}"
    ).fetchall()[0]
    names = ("user_id", "event_time", "event_name", "source_file_or_row")
    metadata: dict = {f"null_{n}": int(v) for n, v in zip(names, nulls)}
    if sum(nulls):
        metadata["reason"] = "accepted events with a null key: " + ", ".join(
            f"{v} null {n}" for n, v in zip(names, nulls) if v
        )
    return dg.AssetCheckResult(
        check_name="keys_not_null", asset_key=RAW_EVENTS, passed=sum(nulls) == 0, metadata=metadata
    )


def check_rejected_provenance(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    """Every quarantined row can be found again in its file and says why it was rejected."""
    (incomplete,) = con.execute(
        f"SELECT count(*) FROM {REJECTED_EVENTS} WHERE source_file IS NULL OR source_row IS NULL "
        "OR source_row < 1 OR raw IS NULL OR reason IS NULL"
    ).fetchall()[0]
    metadata: dict = {"incomplete_rows": int(incomplete)}
    if incomplete:
        metadata["reason"] = f"{incomplete} rejected rows lack their source_file, source_row, raw text or reason"
    return dg.AssetCheckResult(
        check_name="provenance_complete", asset_key=REJECTED_EVENTS, passed=incomplete == 0, metadata=metadata
    )


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            "rows_reconcile",
            asset=RAW_EVENTS,
            blocking=True,
            additional_deps=[REJECTED_EVENTS],
            description="rows read = rows in raw_events + rejected_events, per file and run",
        ),
        dg.AssetCheckSpec(
            "rejected_share_below_threshold",
            asset=RAW_EVENTS,
            blocking=True,
            description="share of bad rows among the rows this run read <= max_rejected_share "
            "(overlap with earlier reads is not bad input; a run with no new input passes)",
        ),
        dg.AssetCheckSpec(
            "keys_not_null",
            asset=RAW_EVENTS,
            blocking=True,
            description="no accepted event lacks user_id, event_time or event_name",
        ),
        dg.AssetCheckSpec(
            "provenance_complete",
            asset=REJECTED_EVENTS,
            description="every rejected row keeps its source_file, source_row, raw text and reason",
        ),
    ],
    pool=WAREHOUSE_POOL,
)
def ingestion_checks(context: dg.AssetCheckExecutionContext, config: IngestionCheckConfig, warehouse: DuckDBWarehouse):
    """Data-quality checks of the ingestion tables, read back from the warehouse."""
    with warehouse.connect() as con:
        ensure_ingested_files(con)
        yield check_reconciliation(con)
        yield check_rejected_share(con, config.max_rejected_share, context.run.run_id)
        yield check_raw_keys_not_null(con)
        yield check_rejected_provenance(con)
