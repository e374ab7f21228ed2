"""Funnel samples: labels, horizon, censoring, no leakage of the future into features, splits."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model_lib.funnel_samples import (
    FUNNELS,
    FunnelSpec,
    build_funnel_samples,
    dense_width,
    samples_to_tensors,
    split_by_user,
    stable_bucket,
)

SPEC = replace(FUNNELS["taobao"], horizon=pd.Timedelta(days=2), drop_censored=False)
T0 = pd.Timestamp("2017-11-25 10:00", tz="UTC")


def frame(rows):
    """rows: (user, hours after T0, event, item, category)."""
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "event_time": [T0 + pd.Timedelta(hours=r[1]) for r in rows],
            "event_name": [r[2] for r in rows],
            "item_id": [r[3] for r in rows],
            "category": [r[4] for r in rows],
        }
    )


EVENTS = frame(
    [
        ("u1", 0, "pv", "A", "c1"),  # anchor of (u1, A)
        ("u1", 1, "cart", "A", "c1"),  # later, within the horizon: cart = 1
        ("u1", 2, "pv", "A", "c1"),  # a second view: no second sample
        ("u1", 72, "buy", "A", "c1"),  # after the 48 h horizon: buy = 0
        ("u1", 3, "cart", "B", "c1"),  # a cart before the first view of B: past, not a label
        ("u1", 5, "pv", "B", "c1"),  # anchor of (u1, B)
        ("u1", 5, "buy", "B", "c1"),  # same second as the anchor: counts as later
        ("u1", 6, "fav", "B", "c1"),
        ("u2", 4, "pv", "A", "c1"),  # anchor of (u2, A)
        ("u2", 8, "cart", "C", "c2"),  # cart of an item u2 never viewed: no sample
        ("u2", 100, "pv", "D", None),  # anchor near the end of the data: censored
        ("u2", 101, "pv", None, None),  # no item: ignored
    ]
)


def sample(samples, user, item):
    row = samples[(samples.user_id == user) & (samples.item_id == item)]
    assert len(row) == 1
    return row.iloc[0]


def test_one_sample_per_viewed_user_item():
    s = build_funnel_samples(EVENTS, SPEC)
    assert sorted(zip(s.user_id, s.item_id)) == [("u1", "A"), ("u1", "B"), ("u2", "A"), ("u2", "D")]
    assert sample(s, "u1", "A").anchor_time == T0


def test_labels_are_later_behaviours_within_the_horizon():
    s = build_funnel_samples(EVENTS, SPEC)
    a, b, u2a = sample(s, "u1", "A"), sample(s, "u1", "B"), sample(s, "u2", "A")
    assert (a.label_cart, a.label_buy, a.label_fav) == (1, 0, 0)  # buy at +72 h is beyond 48 h
    assert (b.label_cart, b.label_buy, b.label_fav) == (0, 1, 1)  # the earlier cart is not a label
    assert (u2a.label_cart, u2a.label_buy) == (0, 0)  # u1's behaviours are not u2's labels
    no_horizon = build_funnel_samples(EVENTS, replace(SPEC, horizon=None))
    assert sample(no_horizon, "u1", "A").label_buy == 1


def test_past_features_count_only_earlier_events():
    s = build_funnel_samples(EVENTS, SPEC)
    a, b, u2a = sample(s, "u1", "A"), sample(s, "u1", "B"), sample(s, "u2", "A")
    assert a.user_prior_events == 0 and np.isnan(a.seconds_since_prev_event)
    # before u1 views B (t = 5 h): pv A, cart A, pv A, cart B; the buy at t = 5 h is not past
    assert (b.user_prior_pv, b.user_prior_cart, b.user_prior_buy, b.user_prior_events) == (2, 2, 0, 4)
    assert b.user_item_prior_cart == 1  # the cart of B before its first view is a past signal
    assert b.user_prior_category_views == 2
    assert b.seconds_since_prev_event == 2 * 3600
    assert u2a.item_prior_views == 2  # u1's two earlier views of A, a popularity signal from the past
    assert (b.hour, b.weekday) == (15, 5)  # 2017-11-25 was a Saturday


def test_censored_samples_are_marked_or_dropped():
    s = build_funnel_samples(EVENTS, SPEC)
    assert sample(s, "u2", "D").censored and not sample(s, "u1", "A").censored
    dropped = build_funnel_samples(EVENTS, replace(SPEC, drop_censored=True))
    assert ("u2", "D") not in set(zip(dropped.user_id, dropped.item_id)) and len(dropped) == 3


def random_events(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": rng.integers(0, 30, n).astype(str),
            "event_time": pd.Timestamp("2020-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 5 * 86400, n), unit="s"),
            "event_name": rng.choice(["pv", "cart", "buy", "fav"], n, p=[0.7, 0.15, 0.1, 0.05]),
            "item_id": rng.integers(0, 60, n).astype(str),
            "category": rng.integers(0, 5, n).astype(str),
        }
    )


def test_features_do_not_see_the_future():
    """Deleting every event from a sample's anchor on must not change its features."""
    events = random_events()
    spec = replace(SPEC, horizon=None)
    full = build_funnel_samples(events, spec).set_index(["user_id", "item_id"])
    features = spec.dense_columns + ["hour", "weekday", "category"]
    rng = np.random.default_rng(1)
    for pos in rng.choice(len(full), 25, replace=False):
        key, row = full.index[pos], full.iloc[pos]
        past = events[events.event_time < row.anchor_time]
        anchor = events[
            (events.user_id == key[0]) & (events.item_id == key[1]) & (events.event_time == row.anchor_time)
        ]
        truncated = build_funnel_samples(pd.concat([past, anchor.iloc[:1]]), spec).set_index(["user_id", "item_id"])
        pd.testing.assert_series_equal(truncated.loc[key, features], row[features], check_names=False)


def test_labels_match_a_direct_count():
    events = random_events(seed=2)
    s = build_funnel_samples(events, replace(SPEC, horizon=pd.Timedelta(hours=12)))
    for _, row in s.sample(20, random_state=0).iterrows():
        mine = events[(events.user_id == row.user_id) & (events.item_id == row.item_id)]
        window = mine[
            (mine.event_time >= row.anchor_time) & (mine.event_time <= row.anchor_time + pd.Timedelta(hours=12))
        ]
        for task in SPEC.tasks:
            assert row[f"label_{task}"] == int((window.event_name == task).any())


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="item_id"):
        build_funnel_samples(EVENTS.drop(columns="item_id"), SPEC)
    with pytest.raises(ValueError):
        FunnelSpec(("pv",))


def test_stable_bucket_is_the_same_in_another_process():
    here = stable_bucket(pd.Series(["u1", "item-42", None, "u1"]), 1000, "user:")
    assert here[0] == here[3] and here[2] == 0  # equal ids share a bucket, 0 means missing
    assert 1 <= here[0] < 1000 and 1 <= here[1] < 1000
    code = (
        "import pandas as pd; from model_lib.funnel_samples import stable_bucket; "
        "print(stable_bucket(pd.Series(['u1', 'item-42']), 1000, 'user:').tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another salt for Python's own hash()
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo, check=True)
    assert out.stdout.strip() == str([int(here[0]), int(here[1])])


def test_split_by_user_is_disjoint_complete_and_stable():
    s = build_funnel_samples(random_events(n=6000, seed=3), SPEC)
    s = pd.concat([s.assign(user_id=s.user_id + f"-{k}") for k in range(10)])  # 300 users
    train, valid, test = split_by_user(s, (0.6, 0.2, 0.2))
    users = [set(x.user_id) for x in (train, valid, test)]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert len(train) + len(valid) + len(test) == len(s)
    assert 0.45 < len(users[0]) / 300 < 0.75
    # a user's split does not move when other users arrive
    more = pd.concat([s, s.assign(user_id=s.user_id + "-new")])
    assert set(split_by_user(more, (0.6, 0.2, 0.2))[2].user_id) >= users[2]


def test_samples_to_tensors_shapes_and_user_embeddings():
    s = build_funnel_samples(EVENTS, SPEC)
    emb = pd.DataFrame({"user_id": ["u1"], "embedding": [np.array([1.0, 2.0, 3.0])]})
    x = samples_to_tensors(s, SPEC, user_embeddings=emb)
    n = len(s)
    assert x["dense"].shape == (n, dense_width(SPEC)) and x["labels"].shape == (n, 3)
    assert x["user_embedding"].shape == (n, 3)
    is_u1 = torch.as_tensor((s.user_id == "u1").to_numpy())
    assert torch.all(x["user_embedding"][is_u1] == torch.tensor([1.0, 2.0, 3.0]))
    assert torch.all(x["user_embedding"][~is_u1] == 0)  # unknown users: zeros
    assert x["group"].tolist() == pd.factorize(s.user_id)[0].tolist()
    assert torch.isfinite(x["dense"]).all()
