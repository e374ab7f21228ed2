"""Known-answer clickstream: Taobao-format events (pv, cart, fav, buy) with two planted mechanisms.

The default simulator is realistic but its answers are not known in closed form. Here they are,
so that the papers' mechanisms can be checked where they *must* win (issue 12, item 5):

(a) **History beats the last session.** Each user has a persistent latent intent ``z``. A session
    shows it only through one weak, noisy signal: whether it contains a ``cart`` (probability
    ``0.05 + 0.45 z``). Future purchases depend on ``z``. The fraction of a user's sessions with a
    cart estimates ``z`` well; the last session's single Bernoulli draw does not. A multi-session
    model must beat the myopic (last-session) one here.
(b) **Order carries what counts lack.** Each user is ``decided`` or ``hesitant`` (half each,
    independent of ``z``). In a session with a cart, a decided user views the item and then carts
    it (``pv, cart``); a hesitant user carts it and then views it again (``cart, pv``). Both make
    exactly the same events, so counts and shares per event name (``st_agg``'s features) carry
    no trace of the type; only the order does. Decided users buy 3x as often as hesitant ones.

Everything else is noise: ``pv`` counts per session, ``fav`` events, items and categories (drawn
from a Zipf catalogue). Purchases are of an item carted before, in a later session. The output is
the canonical event frame with Taobao's event names, so the Taobao task set and funnel apply.
``user_truth`` returns the planted values, for tests only: no model may see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class KnownAnswerConfig:
    n_users: int = 2000
    days: int = 12
    seed: int = 0
    start_date: str = "2017-11-22"
    sessions_per_day: float = 1.0  # mean, per user (every user has its own rate around it)
    order_effect: float = 3.0  # purchase-rate ratio of decided over hesitant users

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.days < 1:
            raise ValueError(f"n_users and days must be positive, got {self.n_users=} {self.days=}")


def user_truth(config: KnownAnswerConfig) -> pd.DataFrame:
    """The planted per-user values (``user_id``, ``intent``, ``decided``, ``sessions_per_day``)."""
    rng = np.random.default_rng([config.seed, 0])
    n = config.n_users
    intent = rng.beta(1.0, 2.0, n)
    decided = rng.random(n) < 0.5
    rate = config.sessions_per_day * rng.lognormal(0.0, 0.4, n)
    return pd.DataFrame(
        {"user_id": [str(100_000 + u) for u in range(n)], "intent": intent, "decided": decided, "rate": rate}
    )


def known_answer_events(config: KnownAnswerConfig = KnownAnswerConfig()) -> pd.DataFrame:
    """All events, sorted by user and time: ``user_id, event_time, event_name, item_id, category``."""
    truth = user_truth(config)
    rng = np.random.default_rng([config.seed, 1])
    horizon = config.days * 86_400.0
    rows: dict[str, list] = {"user": [], "t": [], "name": [], "item": []}

    def emit(user, t, name, item):
        rows["user"].append(user)
        rows["t"].append(t)
        rows["name"].append(name)
        rows["item"].append(item)

    for u, (z, decided, rate) in enumerate(truth[["intent", "decided", "rate"]].itertuples(index=False)):
        buy_rate = (0.02 + 0.5 * z**2) * (1.0 if decided else 1.0 / config.order_effect)
        t = rng.exponential(86_400.0 / rate)
        carted: list[int] = []
        while t < horizon:
            # browsing: noise pages
            for _ in range(1 + rng.poisson(3.0)):
                emit(u, t, "pv", int(rng.zipf(1.4)) % 50_000)
                t += rng.exponential(60.0)
            if rng.random() < 0.05 + 0.45 * z:  # (a): one weak signal of intent per session
                item = int(rng.zipf(1.4)) % 50_000
                first, second = ("pv", "cart") if decided else ("cart", "pv")  # (b): the order
                emit(u, t, first, item)
                emit(u, t + rng.exponential(30.0) + 1.0, second, item)
                t += 120.0
                carted.append(item)
            if rng.random() < 0.1:
                emit(u, t, "fav", int(rng.zipf(1.4)) % 50_000)
                t += 30.0
            if carted and rng.random() < buy_rate:
                emit(u, t, "pv", carted[-1])
                emit(u, t + 20.0, "buy", carted.pop())
                t += 60.0
            t += 3 * 3600.0 + rng.exponential(86_400.0 / rate)  # always a new session at a 2 h gap

    start_ns = pd.Timestamp(config.start_date, tz="UTC").value
    frame = pd.DataFrame(
        {
            "user_id": [str(100_000 + u) for u in rows["user"]],
            "event_time": pd.to_datetime(
                start_ns + np.round(np.asarray(rows["t"]) * 1e3).astype(np.int64) * 1_000_000, utc=True
            ),
            "event_name": rows["name"],
            "item_id": [str(i) for i in rows["item"]],
        }
    )
    frame["category"] = (frame["item_id"].astype(int) % 97).astype(str)
    return frame.sort_values(["user_id", "event_time"], kind="stable").reset_index(drop=True)


__all__ = ["KnownAnswerConfig", "known_answer_events", "user_truth"]
