"""SQL of the `user_splits` and `training_examples` tables (their assets live in training_data.py).

Kept as plain functions over a DuckDB connection so that tests and benchmarks can run the exact
queries the assets run, on any connection that has a `sessionized_events` relation.

Two rules define what an example means; the pipeline, the baselines' features and the test
helpers (tests/trace_test_data.py) all follow them:

- **No straddling** (`history_events_sql`): a session belongs to an example's history if it
  ended before the cutoff, to its future if it started at or after the cutoff; a session in
  progress at the cutoff belongs to *neither* side. Its events before the cutoff are not
  history (`history_end`, the session's start, is where the history stops) and its events
  after the cutoff are not labels. We keep the cutoff itself fixed instead of moving it to the
  session boundary: a moved cutoff would tell the model (through the recency features) that a
  session was under way, i.e. that the user returns, which is a label.
- **No next session** (`NO_NEXT_SESSION`): a `next_session` task is about the user's first
  session that starts within the horizon after the cutoff. If there is none, its label is
  *excluded* (NULL): "what happens in the next session" has no answer, and counting it as
  "returned without it" would mix the return rate into every next-session task. Excluded
  labels are masked out of the losses and dropped by the metrics. `horizon` tasks have a
  window for everyone, so no event in it is an explicit negative (false).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from assets.training_data.tasks import EngagementTask, TaskSet
from resources.warehouse import quote_ident, sql_literal, stage_by_bucket, user_hash_sql

SPLITS = ("train", "valid", "test")


def user_split_bucket_sql(user_column: str, seed: int) -> str:
    """A stable bucket in [0, 10000) per user, salted by the split seed (`user_hash_sql`)."""
    return user_hash_sql(user_column, 10_000, salt=str(int(seed)))


def user_splits_sql(seed: int, valid_share: float, test_share: float) -> str:
    """Every user to exactly one split, so no user's history leaks across train/valid/test."""
    if not (0 < valid_share < 1 and 0 < test_share < 1 and valid_share + test_share < 1):
        raise ValueError(f"shares must be in (0, 1) and sum below 1: {valid_share=}, {test_share=}")
    bucket = user_split_bucket_sql("user_id", seed)
    test_end = round(test_share * 10000)
    valid_end = test_end + round(valid_share * 10000)
    return f"""
        SELECT user_id,
               CASE WHEN {bucket} < {test_end} THEN 'test'
                    WHEN {bucket} < {valid_end} THEN 'valid'
                    ELSE 'train' END AS split
        FROM (SELECT DISTINCT user_id FROM sessionized_events)
        ORDER BY user_id
    """


def cutoff_times(con: duckdb.DuckDBPyConnection, task_set: TaskSet) -> list[datetime]:
    """Rolling cutoffs, newest first: the last one leaves a full label window before the data ends.

    Cutoffs are whole hours (whole days for day-scale horizons), so that simulated sessions,
    which start at random times, rarely straddle one.
    """
    data_end = con.execute("SELECT max(event_time) FROM sessionized_events").fetchall()[0][0]
    if data_end is None:
        raise ValueError("sessionized_events is empty: no cutoffs can be placed")
    unit = "day" if task_set.horizon >= timedelta(days=1) else "hour"
    last = pd.Timestamp(data_end - task_set.horizon).floor("D" if unit == "day" else "h").to_pydatetime()
    return [last - k * task_set.cutoff_step for k in range(task_set.n_cutoffs)]


NO_NEXT_SESSION = None  # the label of a next_session task when the user has no next session


def next_session_label(hit, has_next_session) -> np.ndarray:
    """The no-next-session rule on arrays (the python twin of the SQL): float 1/0, NaN where
    the user has no session starting within the horizon."""
    hit = np.asarray(hit, dtype=bool)
    has_next_session = np.asarray(has_next_session, dtype=bool)
    return np.where(has_next_session, hit.astype(np.float64), np.nan)


def history_events_sql(examples: str = "training_examples") -> str:
    """Each example's history events (the no-straddle rule): `example_id`, `cutoff` and the event
    columns the aggregate baselines need, for events strictly before the example's `history_end`."""
    return f"""
        SELECT x.example_id, x.cutoff, e.event_name, e.event_time, e.event_index, e.session_id,
               e.session_index, e.item_id, e.category
        FROM {examples} x JOIN sessionized_events e
          ON e.user_id = x.user_id AND e.event_time < x.history_end"""


def _label_select(tasks: tuple[EngagementTask, ...]) -> str:
    return ",\n               ".join(f"CAST(({t.label_sql}) AS BOOLEAN) AS {t.column}" for t in tasks)


def training_examples_sql(task_set: TaskSet, cutoffs: list[datetime], events: str = "sessionized_events") -> str:
    """One row per (user, cutoff) with the user active in the observation window before the cutoff.

    Reads `events` (`sessionized_events`, or a relation of some users' rows of it: every join is
    within a user, so users can be built apart) and `user_splits`. History is every session that ended before the
    cutoff (events before `history_end`); labels come from the sessions that start in
    [cutoff, cutoff + horizon) (their events in that window), or from the first of them for
    `next_session` tasks (NULL if there is none). See the module docstring for both rules.
    """
    if not cutoffs:
        raise ValueError("no cutoffs")
    values = ", ".join(f"(TIMESTAMP '{c:%Y-%m-%d %H:%M:%S}')" for c in cutoffs)
    horizon = f"INTERVAL {int(task_set.horizon.total_seconds())} SECOND"
    observation = f"INTERVAL {int(task_set.observation.total_seconds())} SECOND"
    by_window = {w: tuple(t for t in task_set.tasks if t.window == w) for w in ("horizon", "next_session")}
    joins, label_of = [], {}
    for window, tasks in by_window.items():
        if not tasks:
            continue
        source = "future" if window == "horizon" else "next_session"
        joins.append(f"""
        LEFT JOIN (
            SELECT user_id, cutoff,
               {_label_select(tasks)}
            FROM {source} GROUP BY user_id, cutoff
        ) AS {source}_labels USING (user_id, cutoff)""")
        if window == "horizon":  # everyone has a window: nothing in it is an explicit negative
            label_of.update({t.name: f"coalesce({source}_labels.{t.column}, false) AS {t.column}" for t in tasks})
        else:  # no next session: excluded (NO_NEXT_SESSION), the LEFT JOIN leaves NULL
            label_of.update({t.name: f"{source}_labels.{t.column} AS {t.column}" for t in tasks})
    columns = [label_of[t.name] for t in task_set.tasks]
    return f"""
    WITH cutoffs(cutoff) AS (VALUES {values}),
    sessions AS (
        SELECT user_id, session_id, min(event_time) AS session_start, max(event_time) AS session_end
        FROM {events} GROUP BY ALL
    ),
    in_progress AS (  -- the session (at most one per user) that straddles a cutoff: neither side
        SELECT s.user_id, c.cutoff, min(s.session_start) AS session_start
        FROM sessions s JOIN cutoffs c ON s.session_start < c.cutoff AND s.session_end >= c.cutoff
        GROUP BY ALL
    ),
    examples AS (
        SELECT e.user_id, c.cutoff, coalesce(p.session_start, c.cutoff) AS history_end,
               count(*) AS n_history_events,
               count(DISTINCT e.session_id) AS n_history_sessions,
               max(e.event_time) AS last_event_time
        FROM {events} e JOIN cutoffs c ON e.event_time < c.cutoff
        LEFT JOIN in_progress p ON p.user_id = e.user_id AND p.cutoff = c.cutoff
        WHERE e.event_time < coalesce(p.session_start, c.cutoff)
        GROUP BY e.user_id, c.cutoff, p.session_start
        HAVING max(e.event_time) >= c.cutoff - {observation}
    ),
    first_seen_category AS (
        SELECT user_id, category, min(event_time) AS first_seen
        FROM {events} WHERE category IS NOT NULL GROUP BY ALL
    ),
    first_seen_item AS (
        SELECT user_id, item_id, min(event_time) AS first_seen
        FROM {events} WHERE item_id IS NOT NULL GROUP BY ALL
    ),
    future AS (
        SELECT e.*, x.cutoff,
               coalesce(fc.first_seen < x.history_end, false) AS category_seen_before,
               coalesce(fi.first_seen < x.history_end, false) AS item_seen_before
        FROM examples x
        JOIN {events} e
          ON e.user_id = x.user_id AND e.event_time >= x.cutoff AND e.event_time < x.cutoff + {horizon}
        JOIN sessions s ON s.session_id = e.session_id AND s.session_start >= x.cutoff
        LEFT JOIN first_seen_category fc ON fc.user_id = e.user_id AND fc.category = e.category
        LEFT JOIN first_seen_item fi ON fi.user_id = e.user_id AND fi.item_id = e.item_id
    ),
    next_session AS (
        SELECT * FROM future
        QUALIFY session_index = min(session_index) OVER (PARTITION BY user_id, cutoff)
    )
    SELECT x.user_id || '@' || strftime(x.cutoff, '%Y-%m-%dT%H:%M:%S') AS example_id,
           x.user_id, x.cutoff, x.history_end, s.split,
           x.n_history_events, x.n_history_sessions,
           epoch(x.cutoff) - epoch(x.last_event_time) AS seconds_since_last_event,
           {", ".join(columns)}
    FROM examples x
    JOIN user_splits s USING (user_id)
    {"".join(joins)}
    ORDER BY x.cutoff, x.user_id
    """


# What `training_examples_sql` reads of an event besides the columns its tasks' label SQL names.
EXAMPLE_EVENT_COLUMNS = ("user_id", "session_id", "session_index", "event_time", "item_id", "category")


def example_event_columns(con: duckdb.DuckDBPyConnection, task_set: TaskSet) -> list[str]:
    """The `sessionized_events` columns a build of `task_set` reads: `EXAMPLE_EVENT_COLUMNS` and
    every column a label SQL names (a word match: a false hit only carries a column too many).
    All of them if a label SQL selects columns by pattern (`COLUMNS(...)`)."""
    columns = [row[0] for row in con.execute("SELECT * FROM sessionized_events LIMIT 0").description]
    labels = " ".join(t.label_sql for t in task_set.tasks)
    if re.search(r"\bcolumns\s*\(", labels, re.IGNORECASE):
        return columns
    return [
        c for c in columns if c in EXAMPLE_EVENT_COLUMNS or re.search(rf"\b{re.escape(c)}\b", labels, re.IGNORECASE)
    ]


def bucketed_training_examples_sql(
    con: duckdb.DuckDBPyConnection, task_set: TaskSet, cutoffs: list[datetime], buckets: int, staging: Path
) -> str:
    """The rows of `training_examples_sql`, built one user-hash bucket at a time into parquet
    files under ``staging``; returns the query that reads them back in the table's order.

    Why: the query joins every event of its users several ways (sessions, history, labels, first
    sightings of items); over all users at 1e7 events that outgrows DuckDB's memory limit in
    operators that do not spill. A bucket's working set is ~1/``buckets`` of it.

    Each bucket's events are first written apart, in one pass over `sessionized_events`
    (`stage_events_by_bucket`): the query names its events five times, so a bucket that filtered
    `sessionized_events` itself re-read the whole table and re-hashed every user id for each of
    them, in every bucket: work that grows with the data times the number of buckets (at 1e7
    events, 5 buckets, the md5 filters and scans were ~60% of the CPU time)."""
    staging.mkdir(parents=True, exist_ok=True)
    columns = example_event_columns(con, task_set)
    events_of_bucket = stage_events_by_bucket(con, columns, buckets, staging / "events")
    for b, events in events_of_bucket.items():
        target = sql_literal(str(staging / f"bucket-{b:04d}.parquet"))
        con.execute(f"COPY ({training_examples_sql(task_set, cutoffs, events)}) TO {target} (FORMAT parquet)")
    return f"SELECT * FROM read_parquet({sql_literal(str(staging / 'bucket-*.parquet'))}) ORDER BY cutoff, user_id"


def stage_events_by_bucket(
    con: duckdb.DuckDBPyConnection, columns: list[str], buckets: int, folder: Path
) -> dict[int, str]:
    """Write ``columns`` of `sessionized_events` to one parquet folder per user-hash bucket, in one
    read of the table (one md5 per event, `stage_by_bucket`); returns, per bucket that has events,
    the relation of its rows. Only the columns the build reads: the write dominates, and all 22
    columns of the simulator's events took ~3x as long as 7."""
    select = ", ".join(quote_ident(c) for c in columns)
    bucket = user_hash_sql("user_id", buckets, salt="examples")
    return stage_by_bucket(
        con, f"SELECT {select} FROM sessionized_events", bucket, buckets, folder, column="examples_bucket"
    )


def label_balance(con: duckdb.DuckDBPyConnection, relation: str, task_set: TaskSet) -> pd.DataFrame:
    """Positive rate per task and split: the first thing to read before trusting an AUROC.

    One GROUP BY in DuckDB over `relation` (the examples table), so the step never holds the
    examples in memory. `labelled` < `examples` where a label is excluded (next-session tasks of
    users who did not return).
    """
    parts = [
        f"""SELECT {sql_literal(task.name)} AS task, {sql_literal(task.kind)} AS kind, split,
                   count(*) AS examples, count({task.column}) AS labelled,
                   count_if({task.column}::BOOLEAN) AS positives, avg({task.column}::DOUBLE) AS positive_rate
            FROM {relation} GROUP BY split"""
        for task in task_set.tasks
    ]
    counted = con.sql(" UNION ALL ".join(parts)).df()
    grid = pd.DataFrame(
        [(t.name, t.kind, split) for t in task_set.tasks for split in SPLITS], columns=["task", "kind", "split"]
    )
    out = grid.merge(counted, on=["task", "kind", "split"], how="left")
    for column in ("examples", "labelled", "positives"):
        out[column] = out[column].fillna(0).astype(int)
    out["positive_rate"] = out["positive_rate"].astype(float)
    return out
