"""`raw_events` and `rejected_events`: every input row lands in exactly one of them.

One step writes both tables and the ingestion log `ingested_files` in one transaction, so the
contract's reconciliation (rows read = accepted + rejected, per run) holds at every commit, and
the asset checks below verify it from the committed tables.

Incremental and idempotent: a file is keyed by its path and the SHA-256 of its content. A file
seen before is skipped; a new file (or a changed one) is read once and its rows are appended as a
new parquet part of each table. Rows identical to an already accepted row (from this run or an
earlier one) are rejected as `duplicate`, so re-exporting a growing log file is harmless.

Rejection reasons (first that applies): `invalid_utf8`, `blank_line`, `malformed_quoting`,
`truncated_row` (last line cut short), `wrong_column_count`, `missing_user_id`,
`malformed_user_id`, `missing_event_time`, `malformed_event_time`, `event_time_out_of_range`,
`missing_event_name`, `unknown_event_name` (presets with a fixed vocabulary),
`malformed_event_name`, `duplicate` (exact copy of an earlier accepted row; the first is kept).

Plausible time range: by default [1995-01-01, now + 1 day]. That range catches corrupt values
(epoch 0, milliseconds read as seconds, far future), not dataset-specific noise: the Taobao
slices' 39 events dated back to 2017-09-11 are real rows with a plausible date, so they are
accepted; set `min_event_time: "2017-11-25"` in the run config to quarantine them instead.
"""

import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg
import duckdb
import pandas as pd

from assets.common.metadata import markdown_table, warehouse_table_metadata
from assets.ingestion.columns import RAW_EVENTS_COLUMNS, REJECTED_EVENTS_COLUMNS
from resources.event_sources import (
    CANONICAL_KEYS,
    CANONICAL_OPTIONAL,
    EventSource,
    InputFile,
    StagedInput,
    content_hash,
    stage_file,
)
from resources.warehouse import (
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


class IngestionConfig(dg.Config):
    """Validation settings of one ingestion run."""

    min_event_time: str = "1995-01-01"
    max_future_seconds: int = 86_400


@dataclass
class IngestionSummary:
    ingested_at: datetime | None
    new_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


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


def _new_inputs(
    con: duckdb.DuckDBPyConnection, inputs: list[InputFile]
) -> tuple[list[tuple[InputFile, str, os.stat_result]], list[str]]:
    """Split inputs into (new: file, hash, stat) and already-ingested paths.

    The hash of a file whose path, size and mtime match a logged row is reused, so a re-run over
    large unchanged files does not read them again.
    """
    known = con.execute(f"SELECT source_file, content_hash, size_bytes, mtime_ns FROM {INGESTED_FILES}").fetchall()
    seen = {(path, digest) for path, digest, _, _ in known}
    cached = {(path, size, mtime): digest for path, digest, size, mtime in known}
    new, skipped = [], []
    for item in inputs:
        stat = item.path.stat()
        digest = cached.get((item.source_file, stat.st_size, stat.st_mtime_ns))
        if digest is None:
            digest = content_hash(item.path)
        if (item.source_file, digest) in seen:
            skipped.append(item.source_file)
        else:
            new.append((item, digest, stat))
    return new, skipped


def ingest(
    warehouse: DuckDBWarehouse,
    con: duckdb.DuckDBPyConnection,
    inputs: list[InputFile],
    config: IngestionConfig | None = None,
    run_id: str | None = None,
) -> IngestionSummary:
    """Read the new files among `inputs` into `raw_events` / `rejected_events` atomically."""
    config = config or IngestionConfig()
    con.execute(INGESTED_FILES_DDL)
    new, skipped = _new_inputs(con, inputs)
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
    staged_inputs = [stage_file(con, item, ordinal) for ordinal, (item, _, _) in enumerate(new)]
    try:
        attributes: list[str] = []
        for staged in staged_inputs:
            attributes += [a for a in staged.attributes if a not in attributes]
        candidates = "\nUNION ALL BY NAME\n".join(
            f"SELECT {ordinal} AS file_ord, {sql_literal(staged.source_file)} AS source_file, "
            f"*, {_reason_sql(staged, min_time, max_time)} AS reason FROM ({staged.query})"
            for ordinal, staged in enumerate(staged_inputs)
        )
        # Exact duplicates: the same values as an accepted row that comes earlier, in this run
        # (file order, then row) or in the table already (those rank first). A 64-bit hash of
        # the values finds the few suspects cheaply; the exact comparison runs on those only,
        # so a hash collision can never reject a distinct row.
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
        prior = f"SELECT NULL::UBIGINT AS row_hash, {values_of(set())} WHERE false"
        if existing:
            prior = (
                f"SELECT {hash_of(existing)} AS row_hash, {values_of(existing)} "
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
                              ORDER BY is_prior DESC, file_ord, source_row) AS duplicate_rank
    FROM (
        SELECT {values_of(batch_columns)}, file_ord, source_row, false AS is_prior
        FROM _checked WHERE reason IS NULL AND row_hash IN (SELECT row_hash FROM suspects)
        UNION ALL
        SELECT {values_of(set(value_columns))}, -1 AS file_ord, 0::BIGINT AS source_row,
               true AS is_prior
        FROM prior WHERE row_hash IN (SELECT row_hash FROM suspects)
    )
)
SELECT file_ord, source_row FROM ranked WHERE NOT is_prior AND duplicate_rank > 1
"""
        )
        con.execute(
            "UPDATE _checked SET reason = 'duplicate' FROM _duplicates d "
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
            row[0]: (row[1], row[2])
            for row in con.execute(
                "SELECT file_ord, count(*) FILTER (reason IS NULL), "
                "count(*) FILTER (reason IS NOT NULL) FROM _checked GROUP BY file_ord"
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
            for ordinal, ((item, digest, stat), staged) in enumerate(zip(new, staged_inputs)):
                accepted, rejected = counts.get(ordinal, (0, 0))
                con.execute(
                    f"INSERT INTO {INGESTED_FILES} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        item.source_file,
                        digest,
                        stat.st_size,
                        stat.st_mtime_ns,
                        item.preset.name,
                        staged.rows_read,
                        accepted,
                        rejected,
                        ingested_at,
                        run_id,
                    ],
                )
                summary.new_files.append(item.source_file)
                summary.rows_read += staged.rows_read
                summary.rows_accepted += accepted
                summary.rows_rejected += rejected
    finally:
        for staged in staged_inputs:
            for table in staged.temp_tables:
                con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute("DROP TABLE IF EXISTS _duplicates")
        con.execute("DROP TABLE IF EXISTS _checked")
    return summary


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
)
def ingested_events(
    context: dg.AssetExecutionContext,
    config: IngestionConfig,
    warehouse: DuckDBWarehouse,
    event_source: EventSource,
):
    """Validate the event source's new files into raw_events / rejected_events."""
    inputs, ignored = event_source.list_inputs()
    with warehouse.connect() as con:
        summary = ingest(warehouse, con, inputs, config, run_id=context.run_id)
        if summary.new_files:
            context.log.info(
                f"ingested {len(summary.new_files)} file(s): {summary.rows_read} rows read, "
                f"{summary.rows_accepted} accepted, {summary.rows_rejected} rejected"
            )
        else:
            context.log.info(f"no new input among {len(inputs)} file(s): tables unchanged")
        has_tables = table_exists(con, RAW_EVENTS)
        raw_total, users = (
            con.execute(f"SELECT count(*), count(DISTINCT user_id) FROM {RAW_EVENTS}").fetchall()[0]
            if has_tables
            else (0, 0)
        )
        rejected_total = con.execute(f"SELECT count(*) FROM {REJECTED_EVENTS}").fetchall()[0][0] if has_tables else 0
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
    common = {
        "source": event_source.describe(),
        "new_files": dg.MetadataValue.md("\n".join(f"- `{f}`" for f in summary.new_files) or "_(none)_"),
        "files_already_ingested": len(summary.skipped_files),
        "ignored_files": dg.MetadataValue.md("\n".join(f"- `{p}`" for p in ignored) or "_(none)_"),
        "rows_read_this_run": summary.rows_read,
    }
    yield dg.MaterializeResult(
        asset_key=RAW_EVENTS,
        metadata={
            **raw_catalog,  # column schema, preview (this run's rows) as a table
            **common,
            "dagster/row_count": int(raw_total),
            "rows_added": summary.rows_accepted,
            "users": int(users),
        },
    )
    yield dg.MaterializeResult(
        asset_key=REJECTED_EVENTS,
        metadata={
            **rejected_catalog,
            **common,
            "dagster/row_count": int(rejected_total),
            "rows_added": summary.rows_rejected,
            "rejected_by_reason": dg.MetadataValue.md(markdown_table(by_reason, max_rows=50)),
            "preview": dg.MetadataValue.md(markdown_table(rejected_preview)),
        },
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
    return dg.AssetCheckResult(
        check_name="rows_reconcile",
        asset_key=RAW_EVENTS,
        passed=mismatches.empty,
        metadata={
            "files_checked": int(files),
            "mismatches": dg.MetadataValue.md(markdown_table(mismatches)),
        },
    )


def check_rejected_share(con: duckdb.DuckDBPyConnection, max_rejected_share: float) -> dg.AssetCheckResult:
    """A high share of rejected rows in the latest run usually means a wrong format setting."""
    read, rejected = con.execute(
        f"SELECT coalesce(sum(rows_read), 0), coalesce(sum(rows_rejected), 0) "
        f"FROM {INGESTED_FILES} WHERE ingested_at = (SELECT max(ingested_at) FROM {INGESTED_FILES})"
    ).fetchall()[0]
    share = rejected / read if read else 0.0
    return dg.AssetCheckResult(
        check_name="rejected_share_below_threshold",
        asset_key=RAW_EVENTS,
        passed=share <= max_rejected_share,
        metadata={
            "rows_read_latest_run": int(read),
            "rows_rejected_latest_run": int(rejected),
            "rejected_share": float(share),
            "max_rejected_share": max_rejected_share,
        },
    )


def check_raw_keys_not_null(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    nulls = con.execute(
        f"SELECT count(*) FILTER (user_id IS NULL), count(*) FILTER (event_time IS NULL), "
        f"count(*) FILTER (event_name IS NULL), count(*) FILTER (source_file IS NULL "
        f"OR source_row IS NULL) FROM {RAW_EVENTS}"
    ).fetchall()[0]
    names = ("user_id", "event_time", "event_name", "source_file_or_row")
    return dg.AssetCheckResult(
        check_name="keys_not_null",
        asset_key=RAW_EVENTS,
        passed=sum(nulls) == 0,
        metadata={f"null_{n}": int(v) for n, v in zip(names, nulls)},
    )


def check_rejected_provenance(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    """Every quarantined row can be found again in its file and says why it was rejected."""
    (incomplete,) = con.execute(
        f"SELECT count(*) FROM {REJECTED_EVENTS} WHERE source_file IS NULL OR source_row IS NULL "
        "OR source_row < 1 OR raw IS NULL OR reason IS NULL"
    ).fetchall()[0]
    return dg.AssetCheckResult(
        check_name="provenance_complete",
        asset_key=REJECTED_EVENTS,
        passed=incomplete == 0,
        metadata={"incomplete_rows": int(incomplete)},
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
            description="rejected share of the latest run <= max_rejected_share",
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
def ingestion_checks(config: IngestionCheckConfig, warehouse: DuckDBWarehouse):
    """Data-quality checks of the ingestion tables, read back from the warehouse."""
    with warehouse.connect() as con:
        yield check_reconciliation(con)
        yield check_rejected_share(con, config.max_rejected_share)
        yield check_raw_keys_not_null(con)
        yield check_rejected_provenance(con)
