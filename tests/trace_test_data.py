"""Test helpers for the TRACE family: a small pandas sessionizer and labelled examples.

The product sessionizes in DuckDB (assets/sessionization.py); this is a deliberately simple
pandas version of the same columns (docs/ARCHITECTURE.md) so that model_lib tests need no
warehouse. It is a test helper, not a second implementation to be used elsewhere.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def sessionize(events: pd.DataFrame, gap_seconds: float = 7200.0) -> pd.DataFrame:
    """Canonical events -> the sessionized columns (2-hour gap by default)."""
    df = events.copy()
    df["event_time"] = pd.to_datetime(df["event_time"], utc=True)
    df["user_id"] = df["user_id"].astype(str)
    df = df.sort_values(["user_id", "event_time"], kind="stable").reset_index(drop=True)
    secs = df["event_time"].astype("datetime64[ns, UTC]").dt.tz_localize(None).to_numpy().view(np.int64) / 1e9
    same_user = df["user_id"].eq(df["user_id"].shift()).to_numpy()
    gap = np.where(same_user, secs - np.roll(secs, 1), 0.0)
    new_session = ~same_user | (gap > gap_seconds)
    g = df.groupby("user_id", sort=False)
    df["event_index"] = g.cumcount()
    df["session_index"] = pd.Series(new_session.astype(int)).groupby(df["user_id"]).cumsum().to_numpy() - 1
    df["session_id"] = df["user_id"] + ":" + df["session_index"].astype(str)
    df["event_index_in_session"] = df.groupby("session_id", sort=False).cumcount()
    first = secs[np.maximum.accumulate(np.where(new_session, np.arange(len(df)), 0))]
    df["seconds_since_prev_event"] = gap
    df["seconds_since_session_start"] = secs - first
    df["log_seconds_since_prev_event"] = np.log1p(df["seconds_since_prev_event"])
    df["log_seconds_since_session_start"] = np.log1p(df["seconds_since_session_start"])
    df["hour_of_day"] = df["event_time"].dt.hour
    df["day_of_week"] = df["event_time"].dt.dayofweek
    return df


def tiny_events() -> pd.DataFrame:
    """Two users, hand-made: u1 has three sessions, u2 one; handy for position checks."""
    t0 = pd.Timestamp("2026-01-05 08:00", tz="UTC")
    rows = [
        ("u1", t0, "home", "mobile"),
        ("u1", t0 + pd.Timedelta(minutes=1), "search_results", "mobile"),
        ("u1", t0 + pd.Timedelta(hours=5), "property_page", "desktop"),  # session 1
        ("u1", t0 + pd.Timedelta(hours=5, minutes=2), "checkout", "desktop"),
        ("u1", t0 + pd.Timedelta(days=1), "view_order", "app"),  # session 2
        ("u2", t0 + pd.Timedelta(hours=1), "home", None),
        ("u2", t0 + pd.Timedelta(hours=1, minutes=3), "help", "mobile"),
    ]
    df = pd.DataFrame(rows, columns=["user_id", "event_time", "event_name", "device"])
    df["category"] = np.where(df["event_name"].isin(["property_page", "checkout"]), "hotel", None)
    return sessionize(df)


TASKS = (
    "booking_14d",
    "bounce_next_session",
    "search_next_session",
    "property_next_session",
    "view_order_next_session",
)


def label_examples(
    events: pd.DataFrame, cutoffs, observation_days: float = 14.0, horizon_days: float = 14.0
) -> pd.DataFrame:
    """(user_id, cutoff, history_end) for every user active in the observation window before each
    cutoff, with labels whose signal spans sessions (``TASKS``), by the pipeline's two rules
    (assets/training_data/examples_sql.py):

    - no straddling: history is the sessions that ended before the cutoff (events before
      ``history_end``), labels come from the sessions that start at or after it; a session in
      progress at the cutoff is neither;
    - no next session: a ``*_next_session`` label is NaN (excluded) when the user has no session
      starting within the horizon (``next_session_label``).

    Tasks: booking_14d (a booking_confirmation within ``horizon_days``); bounce_next_session
    (the first session after the cutoff is a single page view); *_next_session (that page in it).
    """
    from assets.training_data.examples_sql import next_session_label

    sessions = events.groupby("session_id")["event_time"].agg(["min", "max"])
    session_start = events["session_id"].map(sessions["min"])
    session_end = events["session_id"].map(sessions["max"])
    frames = []
    t = events["event_time"]
    for cutoff in pd.to_datetime(list(cutoffs), utc=True):
        straddles = (session_start < cutoff) & (session_end >= cutoff)
        in_progress = session_start[straddles].groupby(events.loc[straddles, "user_id"]).min()
        history_end = events["user_id"].map(in_progress).fillna(cutoff)
        history = events[t < history_end]
        active = history.groupby("user_id")["event_time"].max() >= cutoff - pd.Timedelta(days=observation_days)
        users = pd.Index(active.index[active.to_numpy()])
        after = events[
            (session_start >= cutoff) & (t < cutoff + pd.Timedelta(days=horizon_days)) & events["user_id"].isin(users)
        ]
        next_session = after[after["session_index"] == after.groupby("user_id")["session_index"].transform("min")]
        ex = pd.DataFrame({"user_id": users, "cutoff": cutoff})
        ex["history_end"] = pd.to_datetime(in_progress.reindex(users).fillna(cutoff).to_numpy(), utc=True)
        ex["booking_14d"] = users.isin(after.loc[after["event_name"] == "booking_confirmation", "user_id"]).astype(
            float
        )
        has_next = users.isin(next_session["user_id"])
        n_next = next_session.groupby("user_id").size().reindex(users, fill_value=0).to_numpy()
        ex["bounce_next_session"] = next_session_label(n_next == 1, has_next)
        for task, page in (
            ("view_order_next_session", "view_order"),
            ("search_next_session", "search_results"),
            ("property_next_session", "property_page"),
        ):
            hit = users.isin(next_session.loc[next_session["event_name"] == page, "user_id"])
            ex[task] = next_session_label(hit, has_next)
        frames.append(ex)
    return pd.concat(frames, ignore_index=True)


def simulated_split(n_users: int = 3000, days: int = 35, seed: int = 0):
    """Sessionized simulator events + labelled examples split by user (60/20/20)."""
    from resources.event_sources.simulator import SimulatorConfig, simulate_events

    events = sessionize(simulate_events(SimulatorConfig(n_users=n_users, days=days, seed=seed)))
    start = events["event_time"].min().normalize()
    cutoffs = [start + pd.Timedelta(days=d) for d in range(14, days - 13, 7)]
    examples = label_examples(events, cutoffs)
    users = np.sort(examples["user_id"].unique())
    rng = np.random.default_rng(seed)
    part = pd.Series(rng.choice(3, len(users), p=[0.6, 0.2, 0.2]), index=users)
    split = part.loc[examples["user_id"]].to_numpy()
    return (
        events,
        examples[split == 0].reset_index(drop=True),
        examples[split == 1].reset_index(drop=True),
        examples[split == 2].reset_index(drop=True),
    )


def simulated_raw_events(n_users: int, days: int, seed: int) -> pd.DataFrame:
    """The simulator's canonical raw events as a client sends them: string user ids, rows in order."""
    from resources.event_sources.simulator import SimulatorConfig, simulate_events

    raw = simulate_events(SimulatorConfig(n_users=n_users, days=days, seed=seed))
    return raw.assign(user_id=raw["user_id"].astype(str)).reset_index(drop=True)


def encoder_at_last_events(raw: pd.DataFrame, max_len: int):
    """A `SequenceEncoder` fitted on every user's history up to their last event, sessionized by
    the product's rule (`model_lib.sessionize`, what a served model applies to raw events)."""
    from model_lib.encoding import EncoderConfig, SequenceEncoder, prepare_events
    from model_lib.sessionize import sessionize as sessionize_raw

    events = sessionize_raw(raw)
    last = events.groupby("user_id")["event_time"].max()
    examples = pd.DataFrame({"user_id": last.index, "cutoff": last.to_numpy()})
    return SequenceEncoder(EncoderConfig(max_len=max_len)).fit(prepare_events(events), examples)
