"""Funnel samples for MTLDS and its baselines: one row per viewed (user, item), one label per
later behaviour on that item.

Definitions (the paper assumes them without spelling them out; these are ours):

- **Sample.** A (user, item) pair with at least one entry-stage event (``funnel[0]``, e.g.
  ``pv``). Its *anchor* is the time of the user's first entry event on that item: the moment a
  recommender would have to score the item.
- **Labels ("later").** ``label_<stage>`` is 1 if the user has a ``stage`` event on that item
  with ``anchor <= event_time <= anchor + horizon``. Events before the anchor are never labels
  (on Taobao about a third of carts precede the first view of the item: they are past, not
  future). Events at the anchor's own timestamp count as later: the anchor view happened first
  in the funnel, and timestamps have one-second resolution.
- **Censoring.** A sample whose window ``anchor + horizon`` ends after the last event of the
  frame could not be observed in full; its labels are biased towards 0. ``drop_censored``
  removes such samples (default), otherwise the ``censored`` column marks them.
- **No leakage.** Every feature is computed from events strictly *before* the anchor
  (``merge_asof(..., allow_exact_matches=False)``), so labels (at or after the anchor) and
  features (before it) never share an event. Item popularity features count every user's
  past events, which a live system also knows at scoring time.
- **Ids.** user, item and category ids are hashed into bounded vocabularies with BLAKE2b, so
  the buckets are the same in every process (Python's ``hash()`` is salted per process).
  Bucket 0 is reserved for a missing id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

KEY = ["user_id", "item_id"]


@dataclass(frozen=True)
class FunnelSpec:
    """Which events form the funnel and how samples are featurised."""

    funnel: tuple[str, ...]  # ordered stages; funnel[0] defines the samples, the rest are labels
    extra_labels: tuple[str, ...] = ()  # labelled behaviours outside the order (Taobao ``fav``)
    horizon: pd.Timedelta | None = pd.Timedelta(days=2)  # noqa: RUF009 (immutable) None: until the end of the frame
    drop_censored: bool = True
    user_buckets: int = 2**14
    item_buckets: int = 2**16
    category_buckets: int = 2**12

    def __post_init__(self):
        if len(self.funnel) < 2:
            raise ValueError(f"a funnel needs an entry stage and at least one label stage, got {self.funnel}")
        names = list(self.funnel) + list(self.extra_labels)
        if len(set(names)) != len(names):
            raise ValueError(f"funnel and extra labels must be distinct event names, got {names}")

    @property
    def funnel_tasks(self) -> tuple[str, ...]:
        """Label stages in funnel order (their order defines the target permutation)."""
        return tuple(self.funnel[1:])

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every labelled behaviour: funnel stages first, in order, then the extra labels."""
        return self.funnel_tasks + tuple(self.extra_labels)

    @property
    def label_columns(self) -> list[str]:
        return [f"label_{t}" for t in self.tasks]

    @property
    def dense_columns(self) -> list[str]:
        """Past-only count features (raw counts in the frame, log1p in the tensors)."""
        stages = list(self.funnel) + list(self.extra_labels)
        return (
            [f"user_prior_{s}" for s in stages]
            + ["user_prior_events", "user_prior_category_views"]
            + [f"user_item_prior_{s}" for s in stages[1:]]
            + ["item_prior_views", f"item_prior_{self.funnel[-1]}", "seconds_since_prev_event"]
        )


# Funnels of the datasets the project reads (names as the canonical event frame spells them).
FUNNELS: dict[str, FunnelSpec] = {
    "taobao": FunnelSpec(("pv", "cart", "buy"), extra_labels=("fav",)),
    "rees46": FunnelSpec(("view", "cart", "purchase")),
    "retailrocket": FunnelSpec(("view", "addtocart", "transaction")),
    "travel": FunnelSpec(("property_page", "checkout", "booking_confirmation")),
}


def stable_bucket(values: pd.Series, buckets: int, salt: str = "") -> np.ndarray:
    """Map ids to ``1 .. buckets-1`` with BLAKE2b (0 = missing); identical in every process.

    Hashes each distinct value once, so the cost is in the number of distinct ids.
    """
    if buckets < 2:
        raise ValueError(f"buckets must be >= 2, got {buckets}")
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    hashed = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(f"{salt}{u}".encode(), digest_size=8).digest(), "little") % (buckets - 1) + 1
            for u in uniques
        ),
        dtype=np.int64,
        count=len(uniques),
    )
    return np.where(codes >= 0, hashed[np.maximum(codes, 0)], 0)


def _past_counts(
    anchors: pd.DataFrame, events: pd.DataFrame, by: list[str], counted: dict[str, pd.Series]
) -> pd.DataFrame:
    """For each anchor row, cumulative counts of ``counted`` indicators over the ``events`` that
    share its ``by`` key and happened strictly before its ``anchor_time``.

    ``anchors`` must carry a unique ``_row`` column; returns a frame indexed by ``_row``.
    """
    ev = events[by + ["event_time"]].copy()
    for name, indicator in counted.items():
        ev[name] = indicator.to_numpy(dtype=np.int64)
    ev = ev.sort_values("event_time", kind="stable")
    ev[list(counted)] = ev.groupby(by, sort=False)[list(counted)].cumsum()
    ev = ev.rename(columns={"event_time": "_prev_time"})
    left = anchors[by + ["anchor_time", "_row"]].sort_values("anchor_time", kind="stable")
    merged = pd.merge_asof(
        left,
        ev,
        left_on="anchor_time",
        right_on="_prev_time",
        by=by,
        allow_exact_matches=False,  # strictly before the anchor: the anchor's own second is "later"
        direction="backward",
    )
    merged[list(counted)] = merged[list(counted)].fillna(0).astype(np.int64)
    return merged.set_index("_row")[list(counted) + ["_prev_time"]]


def build_funnel_samples(events: pd.DataFrame, spec: FunnelSpec) -> pd.DataFrame:
    """Canonical events -> one row per viewed (user, item), with features and labels.

    Columns: ``user_id, item_id, category, anchor_time, censored, user_bucket, item_bucket,
    category_bucket, hour, weekday``, ``spec.dense_columns`` (raw counts; seconds since the
    user's previous event, NaN for a first event) and ``spec.label_columns`` (0/1). Rows are
    ordered by (user_id, anchor_time, item_id). Rows without an item are ignored: they cannot
    be a sample nor a label.
    """
    missing = {"user_id", "event_time", "event_name", "item_id"} - set(events.columns)
    if missing:
        raise ValueError(f"events lack columns {sorted(missing)}")
    ev = events[events["item_id"].notna()]
    ev = pd.DataFrame(
        {
            "user_id": ev["user_id"].astype(str),
            "item_id": ev["item_id"].astype(str),
            "category": ev["category"].astype("string") if "category" in ev else pd.NA,
            "event_name": ev["event_name"].astype(str),
            "event_time": pd.to_datetime(ev["event_time"], utc=True),
        }
    )
    entry_stage, stages = spec.funnel[0], list(spec.funnel) + list(spec.extra_labels)
    is_entry = ev["event_name"] == entry_stage

    # Anchor: the first entry event per (user, item); its category is the item's category.
    anchors = (
        ev[is_entry]
        .sort_values(KEY + ["event_time"], kind="stable")
        .drop_duplicates(KEY, keep="first")
        .rename(columns={"event_time": "anchor_time"})[KEY + ["category", "anchor_time"]]
        .reset_index(drop=True)
    )
    anchors["_row"] = np.arange(len(anchors))

    # Labels: a stage event on the same item at or after the anchor, within the horizon.
    for task in spec.tasks:
        hits = ev.loc[ev["event_name"] == task, KEY + ["event_time"]].merge(
            anchors[KEY + ["anchor_time", "_row"]], on=KEY
        )
        later = hits["event_time"] >= hits["anchor_time"]
        if spec.horizon is not None:
            later &= hits["event_time"] <= hits["anchor_time"] + spec.horizon
        anchors[f"label_{task}"] = np.isin(anchors["_row"], hits.loc[later, "_row"]).astype(np.int64)

    data_end = ev["event_time"].max()
    if spec.horizon is None:
        anchors["censored"] = False
    else:
        anchors["censored"] = (anchors["anchor_time"] + spec.horizon) > data_end

    # Past-only features (strictly before the anchor).
    per_stage = {f"user_prior_{s}": ev["event_name"] == s for s in stages}
    per_stage["user_prior_events"] = pd.Series(True, index=ev.index)
    user_past = _past_counts(anchors, ev, ["user_id"], per_stage)
    anchors = anchors.join(user_past, on="_row")
    gap = (anchors["anchor_time"] - anchors.pop("_prev_time")).dt.total_seconds()
    anchors["seconds_since_prev_event"] = gap  # NaN: no earlier event of this user

    entries = ev[is_entry & ev["category"].notna()]
    cat_past = _past_counts(
        anchors[anchors["category"].notna()],
        entries,
        ["user_id", "category"],
        {"user_prior_category_views": pd.Series(True, index=entries.index)},
    )
    anchors = anchors.join(cat_past[["user_prior_category_views"]], on="_row")

    item_user_counts = {f"user_item_prior_{s}": ev["event_name"] == s for s in stages[1:]}
    anchors = anchors.join(_past_counts(anchors, ev, KEY, item_user_counts).drop(columns="_prev_time"), on="_row")

    last = spec.funnel[-1]
    item_counts = {"item_prior_views": ev["event_name"] == entry_stage, f"item_prior_{last}": ev["event_name"] == last}
    anchors = anchors.join(_past_counts(anchors, ev, ["item_id"], item_counts).drop(columns="_prev_time"), on="_row")

    count_cols = [c for c in spec.dense_columns if c != "seconds_since_prev_event"]
    anchors[count_cols] = anchors[count_cols].fillna(0).astype(np.int64)

    anchors["user_bucket"] = stable_bucket(anchors["user_id"], spec.user_buckets, "user:")
    anchors["item_bucket"] = stable_bucket(anchors["item_id"], spec.item_buckets, "item:")
    anchors["category_bucket"] = stable_bucket(anchors["category"], spec.category_buckets, "category:")
    anchors["hour"] = anchors["anchor_time"].dt.hour.astype(np.int64)
    anchors["weekday"] = anchors["anchor_time"].dt.weekday.astype(np.int64)

    if spec.drop_censored:
        anchors = anchors[~anchors["censored"]]
    columns = (
        KEY
        + ["category", "anchor_time", "censored", "user_bucket", "item_bucket", "category_bucket", "hour", "weekday"]
        + spec.dense_columns
        + spec.label_columns
    )
    return anchors.sort_values(["user_id", "anchor_time", "item_id"], kind="stable")[columns].reset_index(drop=True)


def split_by_user(
    samples: pd.DataFrame, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), salt: str = "split:0"
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, valid, test) with every user in exactly one split.

    A user's split is a function of a stable hash of their id alone, so it does not move when
    new users or events arrive; the fractions hold in expectation, not exactly.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    unit = (stable_bucket(samples["user_id"].astype(str), 2**31, salt) - 1) / (2**31 - 1)  # [N] in [0, 1)
    cut_train, cut_valid = fractions[0], fractions[0] + fractions[1]
    parts = (unit < cut_train, (unit >= cut_train) & (unit < cut_valid), unit >= cut_valid)
    return tuple(samples[p].reset_index(drop=True) for p in parts)


def samples_to_tensors(
    samples: pd.DataFrame, spec: FunnelSpec, user_embeddings: pd.DataFrame | None = None
) -> dict[str, Tensor]:
    """Sample frame -> the ``dict[str, Tensor]`` that ``training.fit`` and the models take.

    Keys (N samples, T = len(spec.tasks), F = len(spec.dense_columns)):
      user, item, category, hour, weekday: int64 [N]
      dense: float32 [N, F]   log1p of the counts and of the seconds since the previous event,
                              plus one indicator "no previous event" (so F = len(dense_columns) + 1)
      labels: float32 [N, T]  in ``spec.tasks`` order
      group: int64 [N]        exact user index within this frame, for per-user NDCG (not a feature)
      user_embedding: float32 [N, D], only with ``user_embeddings`` (columns ``user_id`` and
                              ``embedding``, one array per user, e.g. TRACE's). Users without one
                              get zeros. It must be computed from events before the samples'
                              anchors (e.g. from the training period), or it leaks labels.
    """
    counts = samples[[c for c in spec.dense_columns if c != "seconds_since_prev_event"]].to_numpy(np.float64)
    gap = samples["seconds_since_prev_event"].to_numpy(np.float64)
    first = np.isnan(gap)
    dense = np.column_stack([np.log1p(counts), np.log1p(np.where(first, 0.0, gap)), first.astype(np.float64)])
    out = {
        "user": torch.as_tensor(samples["user_bucket"].to_numpy(np.int64)),
        "item": torch.as_tensor(samples["item_bucket"].to_numpy(np.int64)),
        "category": torch.as_tensor(samples["category_bucket"].to_numpy(np.int64)),
        "hour": torch.as_tensor(samples["hour"].to_numpy(np.int64)),
        "weekday": torch.as_tensor(samples["weekday"].to_numpy(np.int64)),
        "dense": torch.as_tensor(dense, dtype=torch.float32),
        "labels": torch.as_tensor(samples[spec.label_columns].to_numpy(np.float32)),
        "group": torch.as_tensor(pd.factorize(samples["user_id"])[0].astype(np.int64)),
    }
    if user_embeddings is not None:
        table = user_embeddings.assign(user_id=user_embeddings["user_id"].astype(str))
        table = table.drop_duplicates("user_id", keep="last").set_index("user_id")["embedding"]
        matrix = np.zeros((len(samples), len(table.iloc[0])), dtype=np.float32)  # [N, D]
        pos = table.index.get_indexer(samples["user_id"].astype(str))
        known = pos >= 0
        if known.any():
            matrix[known] = np.stack(table.to_numpy()[pos[known]]).astype(np.float32)
        out["user_embedding"] = torch.as_tensor(matrix)
    return out


def dense_width(spec: FunnelSpec) -> int:
    """Width F of ``samples_to_tensors(...)["dense"]``."""
    return len(spec.dense_columns) + 1


__all__ = [
    "FUNNELS",
    "FunnelSpec",
    "build_funnel_samples",
    "dense_width",
    "samples_to_tensors",
    "split_by_user",
    "stable_bucket",
]
