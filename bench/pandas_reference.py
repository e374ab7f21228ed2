"""The straightforward pandas implementation of validation and sessionization.

An independent computation of what `assets/ingestion.py` and `assets/sessionization.py` compute
in DuckDB SQL: the tests compare the two on real data, and `bench/sessionize.py` times them side
by side. Written the way a pandas user would (vectorised groupby, no per-row Python), with no
code shared with the SQL path, so an error in one is not silently repeated in the other.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SESSION_KEYS = ["user_id", "event_time", "source_file", "source_row"]


def sessionize_pandas(events: pd.DataFrame, session_gap_seconds: float = 7200) -> pd.DataFrame:
    """Sessionized frame with the columns of docs/ARCHITECTURE.md, sorted by user and position.

    `events` needs `user_id`, `event_time` (datetime64, naive UTC or tz-aware), `source_file`,
    `source_row`; other columns pass through.
    """
    df = events.sort_values(SESSION_KEYS, kind="mergesort").reset_index(drop=True)
    times = df["event_time"]
    if getattr(times.dt, "tz", None) is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    micros = times.astype("datetime64[us]").astype("int64")
    by_user = df.groupby("user_id", sort=False, observed=True)

    first_of_user = df["user_id"].ne(df["user_id"].shift())
    gap = pd.Series(np.diff(micros.to_numpy(), prepend=0) / 1e6, index=df.index)
    gap[first_of_user] = 0.0
    new_session = first_of_user | (gap > session_gap_seconds)

    df["event_index"] = by_user.cumcount().astype("int32")
    df["session_index"] = new_session.astype("int32").groupby(df["user_id"], sort=False, observed=True).cumsum() - 1
    df["session_index"] = df["session_index"].astype("int32")
    df["session_id"] = df["user_id"].astype(str) + ":" + df["session_index"].astype(str)
    session_start_micros = micros.groupby([df["user_id"], df["session_index"]], sort=False, observed=True).transform(
        "min"
    )
    df["event_index_in_session"] = (
        df.groupby(["user_id", "session_index"], sort=False, observed=True).cumcount()
    ).astype("int32")
    df["seconds_since_prev_event"] = gap
    df["seconds_since_session_start"] = (micros - session_start_micros) / 1e6
    df["log_seconds_since_prev_event"] = np.log1p(df["seconds_since_prev_event"])
    df["log_seconds_since_session_start"] = np.log1p(df["seconds_since_session_start"])
    df["hour_of_day"] = times.dt.hour.astype("int32")
    df["day_of_week"] = times.dt.dayofweek.astype("int32")  # Monday = 0
    return df


def validate_pandas(
    events: pd.DataFrame,
    min_event_time: str = "1995-01-01",
    max_event_time: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accepted, rejected) for an already-parsed canonical frame: null keys, out-of-range
    times and exact duplicates (first kept), in the same precedence as the SQL path."""
    times = events["event_time"]
    if getattr(times.dt, "tz", None) is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    events = events.assign(event_time=times)
    max_event_time = max_event_time or pd.Timestamp.now(tz="UTC").tz_localize(None) + pd.Timedelta(days=1)
    reason = pd.Series(pd.NA, index=events.index, dtype="object")
    user = events["user_id"].astype("string").str.strip()
    name = events["event_name"].astype("string").str.strip()
    reason[user.isna() | (user == "")] = "missing_user_id"
    reason[reason.isna() & times.isna()] = "missing_event_time"
    out_of_range = (times < pd.Timestamp(min_event_time)) | (times > max_event_time)
    reason[reason.isna() & out_of_range] = "event_time_out_of_range"
    reason[reason.isna() & (name.isna() | (name == ""))] = "missing_event_name"
    value_columns = [c for c in events.columns if c not in ("source_file", "source_row", "ingested_at")]
    candidates = reason.isna()
    duplicated = events.loc[candidates, value_columns].duplicated(keep="first")
    reason[duplicated[duplicated].index] = "duplicate"
    rejected = events.loc[reason.notna()].assign(reason=reason[reason.notna()])
    return events.loc[reason.isna()], rejected
