"""What the drift step compares, computed in DuckDB: windows, segments and per-session features.

Nothing here loads every event: session features are SQL aggregates over a bounded sample of
sessions (`USING SAMPLE reservoir(n ROWS) REPEATABLE (seed)`), and the users whose embeddings
are compared are a bounded, md5-ordered sample. Memory is set by `max_sessions` / `max_users`,
not by the size of `sessionized_events`.

Like with like (issue 16): the reference window ends at the champion's last training cutoff
`T_r`; the current window ends at the newest time on the same cutoff grid, `T_c = T_r + k *
cutoff_step <= data end`, and both windows have the same length `T_c - T_r`. So both sides see
the same phase of the day and week, the same amount of time, and (for embeddings) users active
within the same observation window before their side's end, embedded as of that end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb
import pandas as pd

#: Columns of `sessionized_events` (and `raw_events`) that are not event attributes.
NON_ATTRIBUTE_COLUMNS = frozenset(
    {
        "user_id",
        "event_time",
        "event_name",
        "item_id",
        "category",
        "source_file",
        "source_row",
        "ingested_at",
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
REQUIRED_COLUMNS = (
    "user_id",
    "event_time",
    "session_id",
    "event_name",
    "event_index_in_session",
    "seconds_since_session_start",
    "log_seconds_since_prev_event",
    "hour_of_day",
    "day_of_week",
)
DEFAULT_TOP_EVENTS = 8
EVENT_SHARE_PREFIX = "share_"
OTHER_EVENTS = "other"
MAIN_ATTRIBUTE_PREFIX = "main_"
#: Fewest sessions on each side for a segment to be tested (smaller segments are listed as skipped).
MIN_SEGMENT_SESSIONS = 100


def column_token(value) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", str(value)).strip("_").lower() or "blank"


def sql_string(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sql_timestamp(value: datetime) -> str:
    """A naive-UTC TIMESTAMP literal (sessionized_events stores UTC as naive TIMESTAMP)."""
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp
    return f"TIMESTAMP '{stamp.isoformat(sep=' ')}'"


# ----------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class DriftWindows:
    """Two adjacent windows of equal length on the training cutoff grid (naive UTC datetimes)."""

    reference_start: datetime
    reference_end: datetime  # the champion's last training cutoff T_r
    current_end: datetime  # T_c = T_r + k * cutoff_step, at or before the data's end
    observation: timedelta  # a user is compared if active in this window before their side's end

    @property
    def length(self) -> timedelta:
        return self.current_end - self.reference_end

    @property
    def compares_hour_of_day(self) -> bool:
        """Whole days on both sides: the daily profile is comparable."""
        return self.length >= timedelta(days=1)

    @property
    def compares_day_of_week(self) -> bool:
        """A weekly profile is only comparable between windows of a week or more: two days
        before a cutoff and two days after it are different weekdays by construction."""
        return self.length >= timedelta(days=7)

    def describe(self) -> str:
        return (
            f"reference [{self.reference_start}, {self.reference_end}) vs current "
            f"[{self.reference_end}, {self.current_end}) ({self.length})"
        )


def drift_windows(
    last_cutoff: datetime, data_end: datetime, cutoff_step: timedelta, observation: timedelta
) -> DriftWindows:
    """The current window ends on the cutoff grid, so both sides have the same phase and length."""
    if cutoff_step <= timedelta(0):
        raise ValueError(f"cutoff_step must be positive, got {cutoff_step}")
    steps = int((pd.Timestamp(data_end) - pd.Timestamp(last_cutoff)) // pd.Timedelta(cutoff_step))
    if steps < 1:
        raise ValueError(
            f"less than one cutoff step ({cutoff_step}) of events after the last training cutoff "
            f"{last_cutoff} (data ends {data_end}): no current window to compare yet"
        )
    length = steps * cutoff_step
    return DriftWindows(last_cutoff - length, last_cutoff, last_cutoff + length, observation)


def infer_cutoff_grid(cutoffs: Sequence[datetime], last_cutoff: datetime, data_end: datetime) -> timedelta:
    """The step between the two newest training cutoffs; with one cutoff, whole days (or hours)."""
    ordered = sorted(pd.Timestamp(c) for c in cutoffs)
    if len(ordered) >= 2:
        return (ordered[-1] - ordered[-2]).to_pytimedelta()
    gap = pd.Timestamp(data_end) - pd.Timestamp(last_cutoff)
    return timedelta(days=1) if gap >= pd.Timedelta(days=1) else timedelta(hours=1)


# ----------------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class Segment:
    """A sub-population tested on its own: SQL predicates on session starts (alias `s`)."""

    name: str
    reference_where: str
    current_where: str
    description: str


def drift_segments(
    con: duckdb.DuckDBPyConnection, source: str, windows: DriftWindows, trained_at: datetime | None = None
) -> list[Segment]:
    """`all` sessions of each window; `new_users` (first sessions of users first seen in each
    window); `new_files` (sessions whose first event came from files ingested after `trained_at`,
    the champion's registration) against the older files' sessions of the same period.

    Why segments: a shifted sub-population is diluted in `all` (a 12% segment with three drifted
    features moves the whole population's features by a fraction of the test's threshold), not
    in its own segment. `new_files` compares the same period, so it asks "do these files hold
    different behaviour?", not "did time pass?"; it exists only until the next training, so a
    retrained champion stops comparing files it was trained on.
    """
    r0, r1, c1 = (sql_timestamp(t) for t in (windows.reference_start, windows.reference_end, windows.current_end))
    segments = [
        Segment(
            "all",
            f"s.session_start >= {r0} AND s.session_start < {r1}",
            f"s.session_start >= {r1} AND s.session_start < {c1}",
            "every session of each window",
        ),
        Segment(
            "new_users",
            f"s.session_index = 0 AND s.session_start >= {r0} AND s.session_start < {r1}",
            f"s.session_index = 0 AND s.session_start >= {r1} AND s.session_start < {c1}",
            "first sessions of users first seen in each window",
        ),
    ]
    columns = {row[0] for row in con.execute(f"DESCRIBE {source}").fetchall()}
    if trained_at is not None and "ingested_at" in columns:
        new = f"s.ingested_at > {sql_timestamp(trained_at)}"
        [(first, last)] = con.execute(
            f"SELECT min(event_time), max(event_time) FROM {source} s WHERE event_index_in_session = 0 AND {new}"
        ).fetchall()
        if first is not None:
            segments.append(
                Segment(
                    "new_files",
                    f"NOT ({new}) AND s.session_start >= {sql_timestamp(first)} "
                    f"AND s.session_start <= {sql_timestamp(last)}",
                    new,
                    f"sessions of files ingested after {trained_at} vs older files' sessions of the same "
                    f"period [{first}, {last}]",
                )
            )
    return segments


# ----------------------------------------------------------------------------------- features


def attribute_columns(con: duckdb.DuckDBPyConnection, source: str) -> list[str]:
    """Every column that is neither canonical nor derived: the event attributes (contract)."""
    return [row[0] for row in con.execute(f"DESCRIBE {source}").fetchall() if row[0] not in NON_ATTRIBUTE_COLUMNS]


def top_event_names(
    con: duckdb.DuckDBPyConnection, source: str, where: str = "TRUE", n: int = DEFAULT_TOP_EVENTS
) -> list[str]:
    """The n most frequent event names (ties by name): computed on the reference, reused on current."""
    rows = con.execute(
        f"SELECT CAST(event_name AS VARCHAR) AS name, count(*) AS n FROM {source} e WHERE {where} "
        f"GROUP BY 1 ORDER BY n DESC, name LIMIT {int(n)}"
    ).fetchall()
    return [name for name, _ in rows]


def session_features(
    con: duckdb.DuckDBPyConnection,
    source: str,
    where: str = "TRUE",
    *,
    event_names: Sequence[str],
    attributes: Sequence[str] = (),
    max_sessions: int = 50_000,
    seed: int = 0,
    hour_of_day: bool = True,
    day_of_week: bool = True,
) -> pd.DataFrame:
    """One row per session (index `session_id`), for a bounded sample of the sessions of `source`
    whose start (alias `s`: `session_start`, `session_index`, `user_id`, `ingested_at`, ...) meets
    `where`.

    Why per session: sessions are what TRACE encodes, and events of one session are not
    independent samples, which per-event statistical tests would assume. Columns:
    `share_<event>` (share of the session's events for each of `event_names`, plus
    `share_other`), `n_events`, `duration_seconds`, `mean_log_gap` (mean ln(1 + seconds between
    consecutive events) inside the session; NULL for one event), `hour_of_day` / `day_of_week` of
    the session start (categoricals; left out when the windows cannot compare them, see
    `DriftWindows`), and `main_<attribute>` (most frequent value, ties by value).
    """
    missing = set(REQUIRED_COLUMNS) - {row[0] for row in con.execute(f"DESCRIBE {source}").fetchall()}
    if missing:
        raise ValueError(f"{source} lacks columns {sorted(missing)}")
    shares, seen = [], set()
    for name in [*event_names, OTHER_EVENTS]:
        column = EVENT_SHARE_PREFIX + column_token(name)
        if column in seen:
            raise ValueError(f"event names {list(event_names)} collide on feature column {column!r}")
        seen.add(column)
        if name == OTHER_EVENTS:
            listed = ", ".join(sql_string(n) for n in event_names) or "NULL"
            test = f"CAST(e.event_name AS VARCHAR) NOT IN ({listed})"
        else:
            test = f"CAST(e.event_name AS VARCHAR) = {sql_string(name)}"
        shares.append(f"avg(CASE WHEN {test} THEN 1.0 ELSE 0.0 END) AS {column}")
    start_columns = {row[0] for row in con.execute(f"DESCRIBE {source}").fetchall()}
    starts_extra = ", ingested_at" if "ingested_at" in start_columns else ""
    mains, joins = [], []
    for i, attribute in enumerate(attributes):
        column = MAIN_ATTRIBUTE_PREFIX + column_token(attribute)
        mains.append(f"a{i}.{column}")
        joins.append(f"""
        LEFT JOIN (
            SELECT session_id, first(value ORDER BY n DESC, value) AS {column}
            FROM (SELECT session_id, CAST("{attribute}" AS VARCHAR) AS value, count(*) AS n
                  FROM ev WHERE "{attribute}" IS NOT NULL GROUP BY ALL)
            GROUP BY session_id
        ) a{i} USING (session_id)""")
    timing = (["CAST(any_value(s.hour_of_day) AS INTEGER) AS hour_of_day"] if hour_of_day else []) + (
        ["CAST(any_value(s.day_of_week) AS INTEGER) AS day_of_week"] if day_of_week else []
    )
    query = f"""
    WITH s AS (
        SELECT session_id, user_id, session_index, event_time AS session_start, hour_of_day, day_of_week{starts_extra}
        FROM {source} WHERE event_index_in_session = 0
    ),
    sampled AS (
        SELECT * FROM (SELECT * FROM s WHERE {where}) USING SAMPLE reservoir({int(max_sessions)} ROWS) REPEATABLE ({int(seed)})
    ),
    ev AS (SELECT e.* FROM {source} e SEMI JOIN sampled USING (session_id)),
    base AS (
        SELECT e.session_id,
               {", ".join(shares)},
               count(*) AS n_events,
               CAST(max(e.seconds_since_session_start) AS DOUBLE) AS duration_seconds,
               avg(e.log_seconds_since_prev_event) FILTER (WHERE e.event_index_in_session > 0) AS mean_log_gap
               {"".join(", " + t.replace("s.", "x.") for t in timing)}
        FROM ev e JOIN sampled x USING (session_id)
        GROUP BY e.session_id
    )
    SELECT base.*{"".join(", " + m for m in mains)}
    FROM base {"".join(joins)}
    ORDER BY session_id"""
    frame = con.sql(query).df().set_index("session_id")
    frame["n_events"] = frame["n_events"].astype("int64")
    if hour_of_day:
        frame["hour_of_day"] = pd.Categorical(frame["hour_of_day"].astype(int), categories=range(24))
    if day_of_week:
        frame["day_of_week"] = pd.Categorical(frame["day_of_week"].astype(int), categories=range(7))
    for main in mains:
        column = main.split(".", 1)[1]
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def session_features_of_frame(
    events: pd.DataFrame, event_names: Sequence[str] | None = None, attributes: Sequence[str] | None = None, **kwargs
) -> pd.DataFrame:
    """`session_features` of an in-memory sessionized frame (tests, benchmarks): the same SQL."""
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("events_frame", events)
        names = list(event_names) if event_names is not None else top_event_names(con, "events_frame")
        attrs = list(attributes) if attributes is not None else attribute_columns(con, "events_frame")
        # Every session (the reservoir is allocated at its size: never pass more than there are).
        kwargs.setdefault("max_sessions", max(int((events["event_index_in_session"] == 0).sum()), 1))
        return session_features(con, "events_frame", event_names=names, attributes=attrs, **kwargs)
    finally:
        con.close()
