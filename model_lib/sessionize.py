"""Raw canonical events -> sessionized events, in numpy: the served model's twin of the SQL.

A served model receives raw events (contract.md's canonical format) and must cut them into
sessions exactly as `sessionized_events` (DuckDB window SQL, `assets/ingestion/sessionized_events.py`)
did for its training data, or it would see inputs it was never trained on. Same rule, same
columns (docs/ARCHITECTURE.md):

- a user's events are ordered by `event_time`, then `source_file`, then `source_row` when the
  frame has them (the warehouse's tie-break), else by their order in the frame (a request's);
- a session starts at a user's first event and wherever the gap to the previous event is larger
  than `session_gap_seconds` (microsecond times, as DuckDB's `epoch_us`);
- positions are 0-based; `log_*` is `ln(1 + seconds)`; `hour_of_day` and `day_of_week`
  (Monday = 0) are UTC.

`tests/test_sessionize.py` checks equality with the SQL on the real data slices. Vectorised
(one lexsort, no loop over users): a request of a few hundred events costs well under a millisecond.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

DEFAULT_SESSION_GAP_SECONDS = 7200
REQUIRED_COLUMNS = ("user_id", "event_time", "event_name")
#: Columns the sessionizer adds, in the order of the SQL (and of ARCHITECTURE.md).
SESSION_COLUMNS = (
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
)
_US_PER_DAY = 86_400 * 1_000_000
# 1970-01-01 was a Thursday: ISO day index 3 with Monday = 0.
_EPOCH_WEEKDAY = 3


class InvalidEventsError(ValueError):
    """Events that cannot be sessionized (missing column, unparseable time, ...): the client's fault."""


def parse_event_times(values: pd.Series | Iterable) -> pd.Series:
    """Canonical `event_time` values -> tz-naive UTC datetime64[us] Series.

    Accepts datetimes (naive = UTC, aware converted), ISO-8601 strings with or without a zone,
    and Unix epoch seconds (numbers or numeric strings), as ingestion does. Raises
    `InvalidEventsError` naming the first bad value rather than returning NaT.
    """
    series = values if isinstance(values, pd.Series) else pd.Series(list(values))
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        out = series.dt.tz_convert("UTC").dt.tz_localize(None)
    elif pd.api.types.is_datetime64_dtype(series.dtype):
        out = series
    elif pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        out = _from_epoch_seconds(series)
    else:
        values = series.to_numpy(dtype=object)
        # epoch seconds: numbers, or strings that parse as one (vectorised; ISO strings give NaN)
        numbers = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(np.float64)
        numeric = ~np.isnan(numbers)
        if not numeric.any():  # the common case: ISO-8601 strings (or datetimes) only
            out = _parse_iso(pd.Series(values, index=series.index))
        else:
            out = pd.Series(pd.NaT, index=series.index, dtype="datetime64[us]")
            out[numeric] = _from_epoch_seconds(pd.Series(numbers[numeric])).to_numpy()
            if (~numeric).any():
                out[~numeric] = _parse_iso(pd.Series(values[~numeric])).to_numpy()
    out = out.astype("datetime64[us]")
    bad = out.isna()
    if bad.any():
        first = series[bad].iloc[0]
        raise InvalidEventsError(
            f"event_time: {int(bad.sum())} value(s) are not ISO-8601 or Unix epoch seconds, first {first!r}"
        )
    return out


def _parse_iso(values: pd.Series) -> pd.Series:
    """ISO-8601 strings (zone or none = UTC) or datetimes -> naive UTC; NaT where unparseable."""
    try:
        parsed = pd.to_datetime(values, utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        parsed = _parse_one_by_one(values.astype("string"))
    return parsed.dt.tz_localize(None)


def _from_epoch_seconds(numbers: pd.Series) -> pd.Series:
    seconds = numbers.astype("float64")
    return pd.to_datetime((seconds * 1e6).round(), unit="us", errors="coerce")


def _parse_one_by_one(text: pd.Series) -> pd.Series:
    def parse(value):
        try:
            return pd.Timestamp(value).tz_localize("UTC") if pd.Timestamp(value).tzinfo is None else pd.Timestamp(value)
        except (ValueError, TypeError, OverflowError):
            return pd.NaT

    return pd.to_datetime(text.map(parse), utc=True)


def sessionize(events: pd.DataFrame, session_gap_seconds: float = DEFAULT_SESSION_GAP_SECONDS) -> pd.DataFrame:
    """Every input column (event_time as naive UTC), plus SESSION_COLUMNS, rows ordered by
    (user_id, event_index). Equal to `sessionize_sql` on the same rows."""
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise InvalidEventsError(
            f"events lack the required column(s) {missing}: canonical events need {list(REQUIRED_COLUMNS)}"
        )
    if events["user_id"].isna().any():
        raise InvalidEventsError(f"user_id: {int(events['user_id'].isna().sum())} missing value(s)")
    if events["event_name"].isna().any():
        raise InvalidEventsError(f"event_name: {int(events['event_name'].isna().sum())} missing value(s)")
    times = parse_event_times(events["event_time"])
    time_us = times.to_numpy("datetime64[us]").astype(np.int64)
    users = events["user_id"].astype(str).to_numpy(dtype=object)
    user_codes = pd.factorize(users, sort=True)[0]

    keys: list[np.ndarray] = []  # tie-breaks after the time, most significant first
    if "source_file" in events.columns:
        keys.append(pd.factorize(events["source_file"].astype(str), sort=True)[0])
    if "source_row" in events.columns:
        keys.append(events["source_row"].to_numpy())
    keys.append(np.arange(len(events)))  # then the frame's own order
    order = np.lexsort((*keys[::-1], time_us, user_codes))  # the last key sorts first
    n = len(order)
    user = user_codes[order]
    t = time_us[order]

    first_of_user = np.ones(n, bool)
    first_of_user[1:] = user[1:] != user[:-1]
    user_start = np.maximum.accumulate(np.where(first_of_user, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    event_index = np.arange(n) - user_start

    gap_us = np.zeros(n, np.int64)
    gap_us[1:] = t[1:] - t[:-1]
    gap = np.where(first_of_user, 0.0, gap_us / 1e6)
    starts = first_of_user | (gap > float(session_gap_seconds))
    session_count = np.cumsum(starts)
    session_index = session_count - session_count[user_start]  # 0 at each user's first event
    session_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    since_start = (t - t[session_start]) / 1e6

    day = np.floor_divide(t, _US_PER_DAY)
    session_index = session_index.astype(np.int32)
    ordered_users = users[order]
    # one DataFrame construction (column-by-column assignment costs more than the arithmetic)
    columns = {c: events[c].to_numpy()[order] for c in events.columns}
    columns["event_time"] = times.to_numpy()[order]
    columns["user_id"] = ordered_users
    columns["session_id"] = np.array([f"{u}:{s}" for u, s in zip(ordered_users, session_index.tolist())], dtype=object)
    columns["session_index"] = session_index
    columns["event_index"] = event_index.astype(np.int32)
    columns["event_index_in_session"] = (np.arange(n) - session_start).astype(np.int32)
    columns["seconds_since_prev_event"] = gap
    columns["seconds_since_session_start"] = since_start
    columns["log_seconds_since_prev_event"] = np.log(1.0 + gap)
    columns["log_seconds_since_session_start"] = np.log(1.0 + since_start)
    columns["hour_of_day"] = np.floor_divide(t - day * _US_PER_DAY, 3_600_000_000).astype(np.int32)
    columns["day_of_week"] = ((day + _EPOCH_WEEKDAY) % 7).astype(np.int32)
    out = pd.DataFrame(columns, copy=False)
    return out


__all__ = [
    "DEFAULT_SESSION_GAP_SECONDS",
    "REQUIRED_COLUMNS",
    "SESSION_COLUMNS",
    "InvalidEventsError",
    "parse_event_times",
    "sessionize",
]
