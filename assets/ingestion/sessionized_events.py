"""`sessionized_events`: each user's journey cut into sessions, with positions and time features.

Pure DuckDB window SQL over `raw_events`, rebuilt in full and swapped in atomically (parquet
first, then the view) so readers never see a half-built table. Columns and their meaning are
fixed in docs/ARCHITECTURE.md; the order of a user's events is `event_time`, then `source_file`,
then `source_row`, so ties (same second) are broken the same way on every run.
"""

import dagster as dg
import duckdb

from assets.common.metadata import warehouse_table_metadata
from assets.ingestion.columns import SESSIONIZED_EVENTS_COLUMNS
from assets.ingestion.raw_events import RAW_EVENTS
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse, quote_ident

SESSIONIZED_EVENTS = "sessionized_events"
DEFAULT_SESSION_GAP_SECONDS = 7200

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


def sessionize_sql(source: str, raw_columns: list[str], session_gap_seconds: float) -> str:
    """SELECT producing sessionized rows from `source` (any relation with raw_events columns).

    A session starts at a user's first event and wherever the gap to the previous event is
    larger than `session_gap_seconds`. Two sorts in all: one for the gap (`lag`), one for every
    running quantity, which share a window: the event index, the running count of session starts
    (the session index), and the index and time of the latest start (position in the session and
    time since its start; times never decrease along the journey, so the latest start is the max).
    Rows come out unordered (a final sort would cost a third of the query): readers order by
    (user_id, event_index).
    """
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


def build_sessionized_events(
    warehouse: DuckDBWarehouse,
    con: duckdb.DuckDBPyConnection,
    session_gap_seconds: float = DEFAULT_SESSION_GAP_SECONDS,
) -> int:
    """Rebuild `sessionized_events` from `raw_events`; returns its row count."""
    raw_columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {RAW_EVENTS}").fetchall()]
    return warehouse.replace_table(
        con, SESSIONIZED_EVENTS, sessionize_sql(RAW_EVENTS, raw_columns, session_gap_seconds)
    )


class SessionizationConfig(dg.Config):
    session_gap_seconds: int = DEFAULT_SESSION_GAP_SECONDS


@dg.asset(
    deps=[RAW_EVENTS],
    group_name="ingestion",
    owners=["team:data-platform"],
    kinds={"duckdb", "parquet"},
    pool=WAREHOUSE_POOL,
    description="Accepted events split into sessions at an inactivity gap (2 h by default), with "
    "session and event positions and time features, computed in DuckDB SQL.",
)
def sessionized_events(
    context: dg.AssetExecutionContext, config: SessionizationConfig, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """Accepted events with session_id, session/event positions and time features."""
    with warehouse.connect() as con:
        rows = build_sessionized_events(warehouse, con, config.session_gap_seconds)
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
    context.log.info(f"{rows} events, {users} users, {sessions} sessions")
    return dg.MaterializeResult(
        metadata={
            **catalog,  # column schema, preview as a table
            "dagster/row_count": int(rows),
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
    return dg.AssetCheckResult(
        check_name="keys_not_null",
        asset_key=SESSIONIZED_EVENTS,
        passed=sum(counts) == 0,
        metadata={f"null_{c}": int(n) for c, n in zip(columns, counts)},
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
    return dg.AssetCheckResult(
        check_name="positions_contiguous",
        asset_key=SESSIONIZED_EVENTS,
        passed=bad_users == 0 and bad_sessions == 0,
        metadata={"users_with_gaps": int(bad_users), "sessions_with_gaps": int(bad_sessions)},
    )


def check_rows_match_raw_events(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    """Sessionization neither drops nor duplicates events."""
    sessionized, raw = con.execute(
        f"SELECT (SELECT count(*) FROM {SESSIONIZED_EVENTS}), (SELECT count(*) FROM {RAW_EVENTS})"
    ).fetchall()[0]
    return dg.AssetCheckResult(
        check_name="rows_match_raw_events",
        asset_key=SESSIONIZED_EVENTS,
        passed=sessionized == raw,
        metadata={"sessionized_rows": int(sessionized), "raw_rows": int(raw)},
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
