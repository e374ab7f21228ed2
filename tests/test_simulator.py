"""The embedded default event source: deterministic, canonical, and multi-session by design."""

import numpy as np
import pandas as pd
import pytest

from resources.event_sources.simulator import (
    FUNNEL,
    PAGES,
    SimulatorConfig,
    iter_simulated_batches,
    simulate_events,
    write_simulated_parquet,
)

CANONICAL = ["user_id", "event_time", "event_name", "item_id", "category"]


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return simulate_events(SimulatorConfig(n_users=600, days=21, seed=3))


def test_same_config_gives_identical_events(events):
    again = simulate_events(SimulatorConfig(n_users=600, days=21, seed=3))
    pd.testing.assert_frame_equal(events, again)


def test_another_seed_gives_other_events(events):
    other = simulate_events(SimulatorConfig(n_users=600, days=21, seed=4))
    assert len(other) != len(events) or not other.equals(events)


def test_batches_are_the_same_events_as_one_frame():
    config = SimulatorConfig(n_users=9000, days=7, seed=1)
    whole = simulate_events(config)
    batched = pd.concat(list(iter_simulated_batches(config, users_per_batch=4096)), ignore_index=True)
    assert len(batched) == len(whole)
    pd.testing.assert_frame_equal(whole.astype(str), batched.astype(str))


def test_canonical_columns_and_window(events):
    assert list(events.columns[:5]) == CANONICAL
    assert {"device", "channel", "locale", "destination"} <= set(events.columns)
    assert str(events.event_time.dtype) == "datetime64[ns, UTC]"
    assert events[["user_id", "event_time", "event_name"]].notna().all().all()
    start = pd.Timestamp("2026-01-05", tz="UTC")
    assert events.event_time.min() >= start
    # a session that starts inside the window may run a little past it, never a day
    assert events.event_time.max() < start + pd.Timedelta(days=22)
    assert set(events.event_name.unique()) <= set(PAGES)
    assert (events.event_time.dt.microsecond % 1000 == 0).all()  # whole milliseconds


def test_sorted_by_user_then_time(events):
    codes = events.user_id.cat.codes.to_numpy()
    assert (np.diff(codes) >= 0).all()
    same_user = np.diff(codes) == 0
    assert (np.diff(events.event_time.astype("int64").to_numpy())[same_user] >= 0).all()


def test_users_have_several_sessions_at_a_two_hour_gap(events):
    gap = events.groupby("user_id", observed=True).event_time.diff().dt.total_seconds()
    sessions = (gap.isna() | (gap > 7200)).groupby(events.user_id, observed=True).sum()
    assert sessions.median() >= 4
    assert (sessions >= 2).mean() > 0.8


def test_funnel_items_follow_a_view_of_the_same_item(events):
    """Every checkout is of a property the user viewed just before, and every booking of one checked out."""
    prev_name = events.groupby("user_id", observed=True).event_name.shift()
    prev_item = events.groupby("user_id", observed=True).item_id.shift()
    for step, before in zip(FUNNEL[1:], FUNNEL[:-1]):
        rows = events.event_name == step
        assert rows.sum() > 0
        assert (prev_name[rows] == before).all()
        assert (prev_item[rows].astype(str) == events.item_id[rows].astype(str)).all()


def test_bookings_are_followed_by_order_management(events):
    """After a booking a user comes back to view the order: the cross-session signal TRACE needs."""
    booked = events.user_id[events.event_name == "booking_confirmation"].unique()
    order_viewers = events.user_id[events.event_name == "view_order"].unique()
    assert set(order_viewers) <= set(booked)
    assert len(set(order_viewers)) > 0.5 * len(set(booked))


def test_parquet_round_trip(tmp_path):
    config = SimulatorConfig(n_users=300, days=7)
    path = tmp_path / "events.parquet"
    rows = write_simulated_parquet(config, path, users_per_batch=4096)
    back = pd.read_parquet(path)
    assert rows == len(back) == len(simulate_events(config))
    assert not list(tmp_path.glob("*.tmp"))


def test_rejects_nonsense_config():
    with pytest.raises(ValueError):
        SimulatorConfig(n_users=0)
    with pytest.raises(ValueError):
        SimulatorConfig(start_date="not a date")
