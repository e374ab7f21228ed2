"""The known-answer generator plants what it says: (a) history beats the last session, (b) the order
of funnel behaviours carries what per-event counts lack."""

import numpy as np
import pandas as pd
import pytest

from model_lib.metrics import auroc
from resources.event_sources.known_answer import KnownAnswerConfig, known_answer_events, user_truth

CONFIG = KnownAnswerConfig(n_users=1500, days=12, seed=5)
CUTOFF_DAY = 8


@pytest.fixture(scope="module")
def per_user() -> pd.DataFrame:
    """Features from the events before the cutoff, purchase label in the two days after."""
    events = known_answer_events(CONFIG)
    start = pd.Timestamp(CONFIG.start_date, tz="UTC")
    cutoff = start + pd.Timedelta(days=CUTOFF_DAY)
    events = events.assign(
        session=(events.groupby("user_id")["event_time"].diff() > pd.Timedelta(hours=2))
        .groupby(events["user_id"])
        .cumsum()
    )
    past = events[events["event_time"] < cutoff]
    future = events[(events["event_time"] >= cutoff) & (events["event_time"] < cutoff + pd.Timedelta(days=2))]
    sessions = past.groupby(["user_id", "session"]).agg(has_cart=("event_name", lambda s: (s == "cart").any()))
    last = sessions.groupby("user_id")["has_cart"].last().rename("last_session_cart")
    share = sessions.groupby("user_id")["has_cart"].mean().rename("cart_session_share")
    # the order: is a cart followed, within its session, by a page view (hesitant) or not (decided)?
    nxt = past.groupby(["user_id", "session"])["event_name"].shift(-1)
    after_cart = past.assign(next_is_pv=nxt.eq("pv"))[past["event_name"].eq("cart")]
    order = after_cart.groupby("user_id")["next_is_pv"].mean().rename("cart_then_pv_share")
    counts = past.pivot_table(index="user_id", columns="event_name", values="event_time", aggfunc="count").fillna(0)
    shares = counts.div(counts.sum(axis=1), axis=0).add_prefix("share_")
    label = future.groupby("user_id")["event_name"].apply(lambda s: (s == "buy").any()).rename("buy_2d")
    frame = pd.concat([last, share, order, shares], axis=1).join(label).join(user_truth(CONFIG).set_index("user_id"))
    frame["buy_2d"] = frame["buy_2d"].astype(float).fillna(0.0)
    return frame.dropna(subset=["last_session_cart"])


def test_deterministic():
    small = KnownAnswerConfig(n_users=50, seed=1)
    pd.testing.assert_frame_equal(known_answer_events(small), known_answer_events(small))


def test_history_beats_the_last_session(per_user):
    """(a): the share of sessions with a cart estimates the intent far better than the last session."""
    intent_high = (per_user["intent"] > per_user["intent"].median()).astype(float)
    oracle = auroc(intent_high, per_user["cart_session_share"])
    myopic = auroc(intent_high, per_user["last_session_cart"].astype(float))
    assert oracle > myopic + 0.1, (oracle, myopic)
    # and the future purchase follows it
    assert auroc(per_user["buy_2d"], per_user["cart_session_share"]) > auroc(
        per_user["buy_2d"], per_user["last_session_cart"].astype(float)
    )


def test_order_carries_what_counts_lack(per_user):
    """(b): the order of pv and cart reveals the type; the counts and shares per event name do not."""
    with_cart = per_user.dropna(subset=["cart_then_pv_share"])
    decided = with_cart["decided"].astype(float)
    order = auroc(decided, -with_cart["cart_then_pv_share"])
    assert order > 0.95
    for name in ("pv", "cart", "fav"):  # the behaviours whose order is planted: same counts either way
        assert abs(auroc(decided, with_cart[f"share_{name}"]) - 0.5) < 0.08, name
    # past purchases do hint at the type (decided users buy more), far less than the order does
    best_count = max(max(a, 1 - a) for a in (auroc(decided, with_cart[c]) for c in with_cart if c.startswith("share_")))
    assert order > best_count + 0.25
    # decided users buy more, whatever their intent
    rate = with_cart.groupby("decided")["buy_2d"].mean()
    assert rate[True] > 1.5 * rate[False]


def test_taobao_format_and_multi_session():
    events = known_answer_events(KnownAnswerConfig(n_users=200, seed=2))
    assert set(events["event_name"]) <= {"pv", "cart", "fav", "buy"}
    assert list(events.columns) == ["user_id", "event_time", "event_name", "item_id", "category"]
    sessions = events.groupby("user_id")["event_time"].apply(
        lambda t: int((t.diff() > pd.Timedelta(hours=2)).sum()) + 1
    )
    assert np.median(sessions) >= 5
