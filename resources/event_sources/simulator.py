"""Deterministic clickstream simulator of a travel site: the embedded default event source.

A new user's first run needs no data, so the product ships this simulator. It is built so
that the models have something real to learn, and specifically something that only a
*multi-session* view can learn:

- every user has a latent booking intent that persists across sessions (an AR(1) walk around
  the user's own base level), and each session shows it only through a handful of noisy
  page views, so several sessions estimate it far better than the last one does;
- checkout needs *research*: its odds grow with the number of earlier sessions in which the
  user looked at properties, a purely cross-session quantity;
- after a booking the user comes back for a while to manage it (`view_order`, `account`,
  `help` pages, reminder emails), whichever session the booking happened in;
- business travellers browse flights, on desktops, on weekdays; leisure travellers stay with
  a preferred destination, which their search and property pages reveal.

Output is the canonical event frame of docs/ARCHITECTURE.md: `user_id`, `event_time` (UTC),
`event_name`, `item_id`, `category`, and the attributes `device`, `channel`, `locale`,
`destination`. String columns are pandas Categoricals (10M events fit in well under 1 GB);
times are whole milliseconds, so CSV and DuckDB round trips are exact.

Determinism: users are generated in fixed blocks of `BLOCK_USERS`, each from its own
`numpy` generator seeded by `(seed, block)`, so the same config always gives the same events.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

BLOCK_USERS = 4096
MAX_SESSIONS_PER_USER = 400

PAGES = (
    "home",
    "search_results",
    "property_page",
    "flight_page",
    "deals",
    "reviews",
    "account",
    "view_order",
    "help",
    "checkout",
    "booking_confirmation",
)
BROWSE_PAGES = PAGES[:9]  # pages drawn while browsing; checkout and confirmation are the funnel
PAGE = {name: code for code, name in enumerate(PAGES)}

DEVICES = ("mobile", "desktop", "app")
CHANNELS = ("direct", "seo", "sem", "email", "meta", "social")
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "ja_JP", "pt_BR")
LOCALE_SHARE = (0.34, 0.14, 0.13, 0.11, 0.09, 0.07, 0.06, 0.06)
N_DESTINATIONS = 40
DESTINATIONS = tuple(f"dest_{d:02d}" for d in range(N_DESTINATIONS))
PROPERTIES_PER_DESTINATION = 200
PROPERTY_TYPES = ("hotel", "apartment", "resort", "hostel", "villa")
FUNNEL = ("property_page", "checkout", "booking_confirmation")

# Columns whose value only makes sense on destination-bound pages.
_DESTINATION_PAGES = np.array(
    [p in ("search_results", "property_page", "flight_page", "checkout", "booking_confirmation") for p in PAGES]
)


@dataclass(frozen=True)
class SimulatorConfig:
    n_users: int = 2000
    days: int = 28
    seed: int = 0
    start_date: str = "2026-01-05"
    mean_sessions_per_day: float = 0.3
    intent_persistence: float = 0.8  # AR(1) coefficient of intent across sessions
    intent_noise: float = 0.1

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.days < 1:
            raise ValueError(f"n_users and days must be positive, got {self.n_users=} {self.days=}")
        pd.Timestamp(self.start_date)  # raises on a malformed date


def expected_events_per_user(config: SimulatorConfig = SimulatorConfig()) -> float:
    """Measured mean events per user for a config (from 1,000 simulated users), to size a run."""
    probe = SimulatorConfig(**{**config.__dict__, "n_users": 1000})
    return len(simulate_events(probe)) / 1000


def simulate_events(config: SimulatorConfig = SimulatorConfig()) -> pd.DataFrame:
    """All events of `config.n_users` users, sorted by user and time."""
    frames = list(iter_simulated_batches(config, users_per_batch=config.n_users))
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def iter_simulated_batches(config: SimulatorConfig, users_per_batch: int = 50_000) -> Iterator[pd.DataFrame]:
    """Events in batches of whole users, so that a 10M-event run never sits in memory twice."""
    blocks_per_batch = max(1, users_per_batch // BLOCK_USERS)
    n_blocks = -(-config.n_users // BLOCK_USERS)
    for first in range(0, n_blocks, blocks_per_batch):
        parts = [_simulate_block(config, b) for b in range(first, min(first + blocks_per_batch, n_blocks))]
        yield _to_frame(config, _concat_blocks(parts))


def write_simulated_parquet(config: SimulatorConfig, path: str | Path, users_per_batch: int = 50_000) -> int:
    """Stream the simulation into one parquet file; returns rows written. Atomic: tmp + rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rows, writer = 0, None
    try:
        for frame in iter_simulated_batches(config, users_per_batch):
            # Plain strings, not dictionaries: each batch has its own user categories.
            table = pa.Table.from_pandas(frame.astype({c: "string" for c in _string_columns()}), preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
            rows += len(frame)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return rows


def _string_columns() -> list[str]:
    return ["user_id", "event_name", "item_id", "category", "device", "channel", "locale", "destination"]


def _simulate_block(config: SimulatorConfig, block: int) -> dict[str, np.ndarray]:
    """One block of users: a loop over session number, vectorised across the block's users."""
    rng = np.random.default_rng([config.seed, block])
    first_user = block * BLOCK_USERS
    n = min(BLOCK_USERS, config.n_users - first_user)
    horizon = config.days * 86_400.0

    # --- users: persistent traits -------------------------------------------------------
    base_intent = rng.beta(1.2, 3.0, n)
    activity = config.mean_sessions_per_day * rng.lognormal(0.0, 0.6, n)  # sessions/day
    business = rng.random(n) < 0.25
    locale = rng.choice(len(LOCALES), n, p=LOCALE_SHARE)
    dest_weights = 1.0 / np.arange(1, N_DESTINATIONS + 1) ** 0.9
    favourite_destination = rng.choice(N_DESTINATIONS, n, p=dest_weights / dest_weights.sum())
    main_device = np.where(business, 1, rng.choice(3, n, p=(0.55, 0.3, 0.15)))

    # --- sessions: one step per session number, for every user still inside the window ----
    t = rng.exponential(1.0 / activity) * 86_400.0 * 0.5  # first session start, seconds
    intent = np.clip(base_intent + rng.normal(0, config.intent_noise, n), 0.0, 1.0)
    research_sessions = np.zeros(n)
    post_booking_left = np.zeros(n, dtype=np.int64)  # sessions left in which the user manages a booking
    columns: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "user",
            "start",
            "length",
            "intent",
            "post_booking",
            "business",
            "device",
            "channel",
            "destination",
            "checkout",
            "booked",
        )
    }
    for _ in range(MAX_SESSIONS_PER_USER):
        active = np.flatnonzero(t < horizon)
        if active.size == 0:
            break
        m = active.size
        it = intent[active]
        post = post_booking_left[active] > 0
        length = 1 + rng.poisson(1.0 + 9.0 * it + 2.0 * post)
        device = np.where(rng.random(m) < 0.8, main_device[active], rng.integers(0, 3, m))
        channel_logits = np.stack(
            [
                np.full(m, 1.0),  # direct
                np.full(m, 0.6),  # seo
                0.2 + 1.5 * it,  # sem
                0.1 + 2.5 * post,  # email (booking reminders)
                0.1 + 1.0 * it,  # meta search
                np.full(m, 0.3),  # social
            ],
            axis=1,
        )
        channel = _sample_rows(rng, channel_logits)
        destination = np.where(rng.random(m) < 0.7, favourite_destination[active], rng.integers(0, N_DESTINATIONS, m))
        # Checkout needs intent *and* research done in earlier sessions.
        logit = 6.0 * (it - 0.45) + 0.9 * np.minimum(research_sessions[active], 5) - 3.0
        checkout = (~post) & (rng.random(m) < 1.0 / (1.0 + np.exp(-logit)))
        booked = checkout & (rng.random(m) < 0.25 + 0.6 * it)

        for key, value in (
            ("user", active),
            ("start", t[active]),
            ("length", length),
            ("intent", it),
            ("post_booking", post),
            ("business", business[active]),
            ("device", device),
            ("channel", channel),
            ("destination", destination),
            ("checkout", checkout),
            ("booked", booked),
        ):
            columns[key].append(value)

        # State carried to the user's next session.
        research_sessions[active] += (rng.random(m) < 0.2 + 0.8 * it) & ~post
        post_booking_left[active] = np.where(
            booked, 1 + rng.poisson(3.0, m), np.maximum(post_booking_left[active] - 1, 0)
        )
        research_sessions[active] = np.where(booked, 0.0, research_sessions[active])
        drift = config.intent_persistence * it + (1 - config.intent_persistence) * base_intent[active]
        intent[active] = np.clip(np.where(booked, 0.05, drift + rng.normal(0, config.intent_noise, m)), 0.0, 1.0)
        duration = length * 60.0 * 1.5
        gap = rng.exponential(86_400.0 / activity[active]) + 2.5 * 3600.0  # always a new session at 2 h
        t[active] = t[active] + duration + gap

    s = {k: np.concatenate(v) for k, v in columns.items()}
    return _session_events(rng, s, first_user, locale)


def _session_events(
    rng: np.random.Generator, s: dict[str, np.ndarray], first_user: int, locale: np.ndarray
) -> dict[str, np.ndarray]:
    """Expand sessions into page events; append the checkout funnel where the session converts."""
    n_sessions = s["length"].size
    session_of_event = np.repeat(np.arange(n_sessions), s["length"])
    it = s["intent"][session_of_event]
    post = s["post_booking"][session_of_event].astype(float)
    biz = s["business"][session_of_event].astype(float)
    page_logits = np.stack(
        [
            np.full(it.size, 1.0),  # home
            0.5 + 2.5 * it,  # search_results
            0.3 + 3.5 * it,  # property_page
            0.1 + (0.4 + 1.5 * it) * (1 + 2 * biz),  # flight_page
            0.5 * (1 - it),  # deals
            0.2 + 0.8 * it,  # reviews
            0.15 + 1.0 * post,  # account
            2.5 * post,  # view_order
            0.08 + 0.6 * post,  # help
        ],
        axis=1,
    )
    page = _sample_rows(rng, page_logits)

    # Funnel: a converting session ends with property_page -> checkout [-> booking_confirmation].
    converting = np.flatnonzero(s["checkout"])
    tail_len = 2 + s["booked"][converting].astype(np.int64)
    tail_session = np.repeat(converting, tail_len)
    tail_step = np.arange(tail_len.sum()) - np.repeat(np.cumsum(tail_len) - tail_len, tail_len)
    tail_page = np.array([PAGE["property_page"], PAGE["checkout"], PAGE["booking_confirmation"]])[tail_step]

    session = np.concatenate([session_of_event, tail_session])
    page = np.concatenate([page, tail_page])
    is_tail = np.concatenate([np.zeros(session_of_event.size, bool), np.ones(tail_session.size, bool)])
    order = np.lexsort((is_tail, session))  # browsing first, the funnel last, within each session
    session, page, is_tail = session[order], page[order], is_tail[order]
    step_in_session = np.arange(session.size) - np.searchsorted(session, session, side="left")

    # Times: session start + cumulative think times.
    think = np.minimum(rng.lognormal(np.log(40.0), 0.9, session.size), 1800.0)
    think[step_in_session == 0] = 0.0
    cum = np.cumsum(think)
    session_first = np.searchsorted(session, np.arange(n_sessions), side="left")
    offset = cum - cum[session_first[session]]
    seconds = s["start"][session] + offset

    # Items: properties of the session's destination (popular ones convert more), flights.
    destination = s["destination"][session]
    view_rank = np.minimum(rng.zipf(1.3, session.size), PROPERTIES_PER_DESTINATION) - 1
    funnel_rank = np.minimum(rng.zipf(1.8, n_sessions), PROPERTIES_PER_DESTINATION) - 1
    rank = np.where(is_tail, funnel_rank[session], view_rank)
    item_code = np.full(session.size, -1, dtype=np.int64)
    category_code = np.full(session.size, -1, dtype=np.int64)
    is_property = np.isin(page, [PAGE["property_page"], PAGE["checkout"], PAGE["booking_confirmation"]])
    item_code[is_property] = destination[is_property] * PROPERTIES_PER_DESTINATION + rank[is_property]
    category_code[is_property] = (rank[is_property] * 7 + destination[is_property]) % len(PROPERTY_TYPES)
    is_flight = page == PAGE["flight_page"]
    item_code[is_flight] = N_DESTINATIONS * PROPERTIES_PER_DESTINATION + destination[is_flight]
    category_code[is_flight] = len(PROPERTY_TYPES)  # "flight"
    destination_code = np.where(_DESTINATION_PAGES[page], destination, -1)

    user = s["user"][session]
    return {
        "user": user + first_user,
        "seconds": seconds,
        "page": page,
        "item": item_code,
        "category": category_code,
        "device": s["device"][session],
        "channel": s["channel"][session],
        "locale": locale[user],
        "destination": destination_code,
    }


def _sample_rows(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One categorical draw per row of non-negative weights [rows, classes] (inverse CDF)."""
    cdf = np.cumsum(weights, axis=1)
    u = rng.random(weights.shape[0]) * cdf[:, -1]
    return (cdf < u[:, None]).sum(axis=1)


def _concat_blocks(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _to_frame(config: SimulatorConfig, e: dict[str, np.ndarray]) -> pd.DataFrame:
    order = np.lexsort((e["seconds"], e["user"]))
    e = {k: v[order] for k, v in e.items()}
    start_ns = pd.Timestamp(config.start_date, tz="UTC").value
    users, user_codes = np.unique(e["user"], return_inverse=True)
    item_names = np.array(
        [f"p{d:02d}_{r:03d}" for d in range(N_DESTINATIONS) for r in range(PROPERTIES_PER_DESTINATION)]
        + [f"flight_{d:02d}" for d in range(N_DESTINATIONS)]
    )
    return pd.DataFrame(
        {
            "user_id": pd.Categorical.from_codes(user_codes, categories=[f"u{u:07d}" for u in users]),
            "event_time": pd.to_datetime(
                start_ns + np.round(e["seconds"] * 1e3).astype(np.int64) * 1_000_000, utc=True
            ),
            "event_name": pd.Categorical.from_codes(e["page"], categories=list(PAGES)),
            "item_id": pd.Categorical.from_codes(e["item"], categories=list(item_names)),
            "category": pd.Categorical.from_codes(e["category"], categories=[*PROPERTY_TYPES, "flight"]),
            "device": pd.Categorical.from_codes(e["device"], categories=list(DEVICES)),
            "channel": pd.Categorical.from_codes(e["channel"], categories=list(CHANNELS)),
            "locale": pd.Categorical.from_codes(e["locale"], categories=list(LOCALES)),
            "destination": pd.Categorical.from_codes(e["destination"], categories=list(DESTINATIONS)),
        }
    )
