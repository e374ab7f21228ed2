"""`sessionized_events`: each user's journey cut into sessions, with positions and time features.

One DuckDB sort of `raw_events` by (user bucket, user, time, tie-breaks), streamed once in Arrow
batches through the rule (`model_lib.sessionize.sorted_session_columns`, numpy, the code served
models cut requests with; it carries its state across batch borders) and written by pyarrow, one
parquet file per bucket as the sorted stream reaches it. It replaced window SQL that sorted the
rows twice (`lag`, then the running counts) and wrote through a partitioned COPY: 3.5-4.7x a
plain DuckDB sort to one parquet file, now 0.8-1.9x that and 0.6-1.3x the same sort written per
bucket (bench/sessionize.py, on a shared machine). Memory is DuckDB's sort (which spills beyond
`memory_limit`) and a few batches, whatever the data size.

Incremental by user bucket: the table is one parquet file per bucket of users (`md5(user_id)`
modulo `n_buckets`, stable across DuckDB versions), and a run re-sessionizes only the buckets of
users with events ingested since the last build (late events included: a user's whole journey
is recomputed, so old events move to their right sessions). The new bucket files are swapped in
atomically with the build watermark, so readers never see a half-built table. A changed session
gap or bucket count means a full rebuild.

Columns and their meaning are fixed in docs/ARCHITECTURE.md; the order of a user's events is
`event_time`, then `source_file`, then `source_row`, so ties (same second) are broken the same
way on every run.
"""

import collections
import itertools
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.common.metadata import warehouse_table_metadata
from assets.ingestion.columns import SESSIONIZED_EVENTS_COLUMNS
from assets.ingestion.raw_events import RAW_EVENTS
from model_lib.sessionize import SessionCarry, sorted_session_columns
from resources.warehouse import (
    PARQUET_CATALOG,
    WAREHOUSE_POOL,
    DuckDBWarehouse,
    sql_literal,
    table_exists,
    utc_now,
)

SESSIONIZED_EVENTS = "sessionized_events"
SESSIONIZATION_LOG = "sessionization_log"
DEFAULT_SESSION_GAP_SECONDS = 7200
DEFAULT_USER_BUCKETS = 32

SESSIONIZATION_LOG_DDL = f"""
CREATE TABLE IF NOT EXISTS {SESSIONIZATION_LOG} (
    built_at            TIMESTAMP NOT NULL,
    session_gap_seconds DOUBLE    NOT NULL,
    n_buckets           INTEGER   NOT NULL,
    raw_ingested_through TIMESTAMP,         -- max(raw_events.ingested_at) sessionized
    buckets_rebuilt     INTEGER   NOT NULL,
    rows_written        BIGINT    NOT NULL
)
"""

# (name, SQL type), in the order ARCHITECTURE.md lists them, appended to the raw_events columns.
SESSION_COLUMNS = (
    ("session_id", "VARCHAR"),
    ("session_index", "INTEGER"),
    ("event_index", "INTEGER"),
    ("event_index_in_session", "INTEGER"),
    ("seconds_since_prev_event", "DOUBLE"),
    ("seconds_since_session_start", "DOUBLE"),
    ("log_seconds_since_prev_event", "DOUBLE"),
    ("log_seconds_since_session_start", "DOUBLE"),
    ("hour_of_day", "INTEGER"),
    ("day_of_week", "INTEGER"),
)


#: A user's journey order: time, then ties broken the same way on every run.
JOURNEY_ORDER = ("user_id", "event_time", "source_file", "source_row")
#: Rows per Arrow batch of the sorted stream (DuckDB's row group size): each becomes a row group.
STREAM_BATCH_ROWS = 122_880


def sorted_events_sql(source: str, bucket: str) -> str:
    """`source`'s rows (raw_events columns) with their user bucket as `_bucket`, ordered by bucket,
    then by each user's journey: the one sort sessionization needs (users never span buckets)."""
    return f"SELECT *, {bucket} AS _bucket FROM {source} ORDER BY _bucket, {', '.join(JOURNEY_ORDER)}"


def user_bucket_sql(n_buckets: int) -> str:
    """A user's bucket: md5 is stable across DuckDB versions (hash() is not).

    The value is `md5_number_lower(user_id) % n_buckets`, the bucket function the persisted bucket
    files were written with; DuckDB 2.0 defines that macro through a 128-character bit string
    (`md5_number(x)::BIT::VARCHAR[:64]::BIT::UBIGINT`), i.e. the upper 64 bits of `md5_number`,
    which the shift takes ~5x cheaper (tests/test_sessionization.py checks that both agree).
    """
    return f"CAST(CAST(md5_number(user_id) >> 64 AS UBIGINT) % {int(n_buckets)} AS INTEGER)"


def _bucket_of_part(path: str) -> int | None:
    name = Path(path).name  # sessionized_events-b0007-<stamp>.parquet
    if name.startswith(f"{SESSIONIZED_EVENTS}-b"):
        return int(name[len(SESSIONIZED_EVENTS) + 2 :].split("-", 1)[0])
    return None


@dataclass
class SessionizationRun:
    rows_written: int  # rows of the rebuilt buckets
    buckets_rebuilt: int
    n_buckets: int
    full_rebuild: bool
    reason: str  # why this much was rebuilt


def build_sessionized_events(
    warehouse: DuckDBWarehouse,
    con: duckdb.DuckDBPyConnection,
    session_gap_seconds: float = DEFAULT_SESSION_GAP_SECONDS,
    n_buckets: int = DEFAULT_USER_BUCKETS,
    full_rebuild: bool = False,
) -> SessionizationRun:
    """Re-sessionize the user buckets with events ingested since the last build (all of them on
    the first build, on `full_rebuild`, or when the gap or bucket count changed)."""
    con.execute(SESSIONIZATION_LOG_DDL)
    (through,) = con.execute(f"SELECT max(ingested_at) FROM {RAW_EVENTS}").fetchall()[0]
    last = con.execute(
        f"SELECT session_gap_seconds, n_buckets, raw_ingested_through FROM {SESSIONIZATION_LOG} "
        "ORDER BY built_at DESC LIMIT 1"
    ).fetchall()
    bucket = user_bucket_sql(n_buckets)
    if full_rebuild:
        reason = "full rebuild requested"
    elif not last or not table_exists(con, SESSIONIZED_EVENTS):
        reason, full_rebuild = "first build", True
    elif (float(last[0][0]), int(last[0][1])) != (float(session_gap_seconds), n_buckets):
        reason, full_rebuild = "session gap or bucket count changed: full rebuild", True
    else:
        reason = ""
    if full_rebuild:
        buckets = list(range(n_buckets))
    else:
        watermark = last[0][2]
        newer = "true" if watermark is None else f"ingested_at > TIMESTAMP {sql_literal(str(watermark))}"
        buckets = [
            row[0]
            for row in con.execute(f"SELECT DISTINCT {bucket} FROM {RAW_EVENTS} WHERE {newer} ORDER BY 1").fetchall()
        ]
        reason = (
            f"{len(buckets)} of {n_buckets} user buckets have events ingested since {watermark}"
            if buckets
            else f"no events ingested since {watermark}: nothing to re-sessionize"
        )
    parts: list[tuple[Path, int]] = []
    if buckets:
        bucket_list = ", ".join(str(b) for b in buckets)
        source = RAW_EVENTS if full_rebuild else f"(SELECT * FROM {RAW_EVENTS} WHERE {bucket} IN ({bucket_list}))"
        # no accepted event yet on a full rebuild: an empty table, not a missing one
        parts = _write_bucket_parts(
            warehouse, con, sorted_events_sql(source, bucket), session_gap_seconds, full_rebuild
        )
    rows = sum(n for _, n in parts)
    con.execute("BEGIN TRANSACTION")
    try:
        old = con.execute(f"SELECT path FROM {PARQUET_CATALOG} WHERE table_name = ?", [SESSIONIZED_EVENTS]).fetchall()
        stale = [p for (p,) in old if full_rebuild or _bucket_of_part(p) in set(buckets) or _bucket_of_part(p) is None]
        if stale:
            con.execute(
                f"DELETE FROM {PARQUET_CATALOG} WHERE table_name = ? AND list_contains(?, path)",
                [SESSIONIZED_EVENTS, stale],
            )
        if parts or stale or not table_exists(con, SESSIONIZED_EVENTS):
            warehouse.register_parquet(con, SESSIONIZED_EVENTS, parts, replace=False)
        con.execute(
            f"INSERT INTO {SESSIONIZATION_LOG} VALUES (?, ?, ?, ?, ?, ?)",
            [utc_now(), float(session_gap_seconds), n_buckets, through, len(buckets), rows],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    warehouse.sweep_unreferenced(con, SESSIONIZED_EVENTS)
    return SessionizationRun(rows, len(buckets), n_buckets, full_rebuild, reason)


def _write_bucket_parts(
    warehouse: DuckDBWarehouse,
    con: duckdb.DuckDBPyConnection,
    sorted_query: str,
    session_gap_seconds: float,
    empty_part: bool,
) -> list[tuple[Path, int]]:
    """Sessionize `sorted_query`'s rows (`sorted_events_sql`) batch by batch and write one parquet
    file per user bucket; with `empty_part`, an empty file when there is no row.

    Files are written on a background thread in stream order while this one pulls and sessionizes
    the next batches (pyarrow writes without the GIL), at most `_WRITES_IN_FLIGHT` batches behind.
    Memory: DuckDB's sort (spilling beyond `memory_limit`) and a few batches; the rule carries its
    state across batch borders.
    """
    reader = con.sql(sorted_query).to_arrow_reader(STREAM_BATCH_ROWS)
    raw_fields = [f for f in reader.schema if f.name != "_bucket"]
    schema = pa.schema(raw_fields + [pa.field(name, _ARROW_TYPES[sql_type]) for name, sql_type in SESSION_COLUMNS])
    stamp = utc_now().strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:8]
    parts = _BucketParts(warehouse.table_dir(SESSIONIZED_EVENTS), stamp, schema)
    carry: SessionCarry | None = None
    last_user: str | None = None
    pending: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sessionized-parts") as pool:
        try:
            for batch in reader:
                if not batch.num_rows:
                    continue
                out, carry, last_user = _sessionize_batch(batch, schema, session_gap_seconds, carry, last_user)
                bucket = batch.column(batch.schema.get_field_index("_bucket")).to_numpy()
                borders = [0, *(np.flatnonzero(bucket[1:] != bucket[:-1]) + 1).tolist(), len(bucket)]
                for lo, hi in itertools.pairwise(borders):
                    pending.append(pool.submit(parts.write, int(bucket[lo]), out.slice(lo, hi - lo)))
                while len(pending) > _WRITES_IN_FLIGHT:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
            pool.submit(parts.finish, empty_part).result()
        except BaseException:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            parts.abort()
            raise
        finally:
            reader.close()
    return parts.done


_WRITES_IN_FLIGHT = 2


class _BucketParts:
    """The parquet files of a stream sorted by bucket: one per bucket, each renamed to its final
    name only when complete (the stream has moved on to the next bucket)."""

    def __init__(self, directory: Path, stamp: str, schema: pa.Schema):
        self.directory, self.stamp, self.schema = directory, stamp, schema
        # Dictionaries for the strings (ids, names, attributes) but session_id, nearly one value
        # per session, where the dictionary only costs time (~0.3 s per 10^6 rows) before its fallback.
        self.dictionary = [f.name for f in schema if pa.types.is_string(f.type) and f.name != "session_id"]
        self.done: list[tuple[Path, int]] = []
        self.bucket: int | None = None
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def _path(self, temporary: bool = False) -> Path:
        bucket = "" if self.bucket is None else f"b{self.bucket:04d}-"
        return self.directory / f"{'.tmp-' if temporary else ''}{SESSIONIZED_EVENTS}-{bucket}{self.stamp}.parquet"

    def _open(self, bucket: int | None) -> None:
        self.bucket, self.rows = bucket, 0
        self.writer = pq.ParquetWriter(
            self._path(temporary=True), self.schema, compression="snappy", use_dictionary=self.dictionary
        )

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self._path(temporary=True).rename(self._path())
            self.done.append((self._path(), self.rows))

    def write(self, bucket: int, batch: pa.RecordBatch) -> None:
        if self.writer is None or bucket != self.bucket:
            self._close()
            self._open(bucket)
        self.writer.write_batch(batch)
        self.rows += batch.num_rows

    def finish(self, empty_part: bool) -> None:
        if empty_part and not self.done and self.writer is None:
            self._open(None)  # sessionized_events-<stamp>.parquet: no bucket, no row
        self._close()

    def abort(self) -> None:
        """Remove what was written: nothing refers to these files yet."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self._path(temporary=True).unlink(missing_ok=True)
        for path, _ in self.done:
            path.unlink(missing_ok=True)
        self.done = []


_ARROW_TYPES = {"VARCHAR": pa.string(), "INTEGER": pa.int32(), "DOUBLE": pa.float64()}


def _sessionize_batch(
    batch: pa.RecordBatch,
    schema: pa.Schema,
    session_gap_seconds: float,
    carry: SessionCarry | None,
    last_user: str | None,
) -> tuple[pa.RecordBatch, SessionCarry | None, str | None]:
    """One batch of the sorted stream -> its sessionized rows, with the state for the next batch."""
    users, times = (
        batch.column(batch.schema.get_field_index("user_id")),
        batch.column(batch.schema.get_field_index("event_time")),
    )
    if users.null_count or times.null_count:  # ingestion rejects these: a broken invariant, not bad input
        raise ValueError("raw_events has rows with a null user_id or event_time: they cannot be sessionized")
    if times.type != pa.timestamp("us"):
        raise TypeError(f"raw_events.event_time is {times.type}, expected timestamp[us] (DuckDB TIMESTAMP)")
    n = batch.num_rows
    first_of_user = np.ones(n, bool)
    first_of_user[1:] = pc.not_equal(users.slice(1), users.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    first_of_user[0] = last_user is None or users[0].as_py() != last_user
    columns, carry = sorted_session_columns(
        first_of_user, times.cast(pa.int64()).to_numpy(), session_gap_seconds, carry
    )
    session_index = pa.array(columns["session_index"])
    arrays = [batch.column(batch.schema.get_field_index(name)) for name in schema.names[: -len(SESSION_COLUMNS)]]
    arrays.append(pc.binary_join_element_wise(users, pc.cast(session_index, pa.string()), ":"))
    arrays += [pa.array(columns[name]) for name, _ in SESSION_COLUMNS[1:]]
    return pa.RecordBatch.from_arrays(arrays, schema=schema), carry, users[n - 1].as_py()


class SessionizationConfig(dg.Config):
    session_gap_seconds: int = DEFAULT_SESSION_GAP_SECONDS
    n_buckets: int = DEFAULT_USER_BUCKETS  # user buckets: the unit of incremental rebuilds
    full_rebuild: bool = False


@dg.asset(
    deps=[RAW_EVENTS],
    group_name="ingestion",
    owners=["team:data-platform"],
    kinds={"duckdb", "parquet"},
    pool=WAREHOUSE_POOL,
    description="Accepted events split into sessions at an inactivity gap (2 h by default), with "
    "session and event positions and time features, computed over one DuckDB sort.",
)
def sessionized_events(
    context: dg.AssetExecutionContext, config: SessionizationConfig, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """Accepted events with session_id, session/event positions and time features."""
    with warehouse.connect() as con:
        run = build_sessionized_events(
            warehouse, con, config.session_gap_seconds, config.n_buckets, config.full_rebuild
        )
        (rows,) = con.execute(f"SELECT count(*) FROM {SESSIONIZED_EVENTS}").fetchall()[0]
        users, sessions, multi = con.execute(
            f"""
SELECT count(*), sum(n_sessions), count(*) FILTER (n_sessions >= 2)
FROM (SELECT user_id, max(session_index) + 1 AS n_sessions
      FROM {SESSIONIZED_EVENTS} GROUP BY user_id)"""
        ).fetchall()[0]
        catalog = warehouse_table_metadata(
            con,
            SESSIONIZED_EVENTS,
            SESSIONIZED_EVENTS_COLUMNS,
            preview_rows=8,
            preview_sql=f"SELECT user_id, event_time, event_name, session_id, event_index, "
            f"event_index_in_session, seconds_since_prev_event FROM {SESSIONIZED_EVENTS} LIMIT 8",
        )
        per_user = (
            con.execute(
                f"SELECT quantile_cont(n, [0.1, 0.5, 0.9]) FROM (SELECT max(session_index) + 1 AS n "
                f"FROM {SESSIONIZED_EVENTS} GROUP BY user_id)"
            ).fetchall()[0][0]
            if users
            else None
        )
    context.log.info(f"{run.reason}; {rows} events, {users} users, {sessions} sessions")
    return dg.MaterializeResult(
        metadata={
            **catalog,  # column schema, preview as a table
            "dagster/row_count": int(rows),
            "rebuild": run.reason,
            "buckets_rebuilt": run.buckets_rebuilt,
            "n_buckets": run.n_buckets,
            "rows_rewritten": run.rows_written,
            "users": int(users or 0),
            "sessions": int(sessions or 0),
            "users_with_2plus_sessions": int(multi or 0),
            "sessions_per_user_p10_p50_p90": str(per_user),
            "session_gap_seconds": config.session_gap_seconds,
        }
    )


def check_session_keys_not_null(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    columns = (
        "user_id",
        "event_time",
        "event_name",
        "session_id",
        "session_index",
        "event_index",
        "event_index_in_session",
    )
    counts = con.execute(
        "SELECT " + ", ".join(f"count(*) FILTER ({c} IS NULL)" for c in columns) + f" FROM {SESSIONIZED_EVENTS}"
    ).fetchall()[0]
    metadata: dict = {f"null_{c}": int(n) for c, n in zip(columns, counts)}
    if sum(counts):
        metadata["reason"] = "sessionized events with a null key: " + ", ".join(
            f"{n} null {c}" for c, n in zip(columns, counts) if n
        )
    return dg.AssetCheckResult(
        check_name="keys_not_null", asset_key=SESSIONIZED_EVENTS, passed=sum(counts) == 0, metadata=metadata
    )


def check_positions_contiguous(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    """event_index is 0..n-1 per user, event_index_in_session 0..k-1 per session, and
    session_index 0..s-1 per user: what the position embeddings of the models rely on."""
    bad_users, bad_sessions = con.execute(
        f"""
WITH per_user AS (
    SELECT user_id, count(*) AS n, min(event_index) AS lo, max(event_index) AS hi,
           count(DISTINCT event_index) AS distinct_events,
           min(session_index) AS s_lo, max(session_index) AS s_hi,
           count(DISTINCT session_index) AS distinct_sessions
    FROM {SESSIONIZED_EVENTS} GROUP BY user_id
), per_session AS (
    SELECT user_id, session_index, count(*) AS n, min(event_index_in_session) AS lo,
           max(event_index_in_session) AS hi,
           count(DISTINCT event_index_in_session) AS distinct_positions,
           count(DISTINCT session_id) AS ids
    FROM {SESSIONIZED_EVENTS} GROUP BY user_id, session_index
)
SELECT
    (SELECT count(*) FROM per_user
      WHERE lo <> 0 OR hi <> n - 1 OR distinct_events <> n
         OR s_lo <> 0 OR s_hi <> distinct_sessions - 1),
    (SELECT count(*) FROM per_session
      WHERE lo <> 0 OR hi <> n - 1 OR distinct_positions <> n OR ids <> 1)
"""
    ).fetchall()[0]
    passed = bad_users == 0 and bad_sessions == 0
    metadata: dict = {"users_with_gaps": int(bad_users), "sessions_with_gaps": int(bad_sessions)}
    if not passed:
        metadata["reason"] = (
            f"positions are not 0..n-1: {bad_users} user(s) with gaps or repeats in event_index or "
            f"session_index, {bad_sessions} session(s) in event_index_in_session or session_id"
        )
    return dg.AssetCheckResult(
        check_name="positions_contiguous", asset_key=SESSIONIZED_EVENTS, passed=passed, metadata=metadata
    )


def check_rows_match_raw_events(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    """Sessionization neither drops nor duplicates events."""
    sessionized, raw = con.execute(
        f"SELECT (SELECT count(*) FROM {SESSIONIZED_EVENTS}), (SELECT count(*) FROM {RAW_EVENTS})"
    ).fetchall()[0]
    metadata: dict = {"sessionized_rows": int(sessionized), "raw_rows": int(raw)}
    if sessionized != raw:
        metadata["reason"] = f"{sessionized} sessionized rows for {raw} accepted raw events"
    return dg.AssetCheckResult(
        check_name="rows_match_raw_events", asset_key=SESSIONIZED_EVENTS, passed=sessionized == raw, metadata=metadata
    )


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            "keys_not_null", asset=SESSIONIZED_EVENTS, blocking=True, description="no null user, session or position"
        ),
        dg.AssetCheckSpec(
            "positions_contiguous",
            asset=SESSIONIZED_EVENTS,
            blocking=True,
            description="event_index, session_index, event_index_in_session run 0..n-1 without gaps",
        ),
        dg.AssetCheckSpec(
            "rows_match_raw_events",
            asset=SESSIONIZED_EVENTS,
            blocking=True,
            additional_deps=[RAW_EVENTS],
            description="one sessionized row per accepted raw event",
        ),
    ],
    pool=WAREHOUSE_POOL,
)
def sessionization_checks(warehouse: DuckDBWarehouse):
    """Structural checks of sessionized_events, read back from the warehouse."""
    with warehouse.connect() as con:
        yield check_session_keys_not_null(con)
        yield check_positions_contiguous(con)
        yield check_rows_match_raw_events(con)
