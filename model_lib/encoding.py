"""Sessionized events + (user_id, cutoff) examples -> fixed-length tensors for sequence models.

For each example the encoder takes the user's most recent ``max_len`` events strictly before the
cutoff (or only those of the most recent session, ``last_session_only``, the myopic view) and
returns, left-aligned in chronological order with padding on the right:

- ``cat_ids``       int32 [N, L, C]  vocabulary ids of each categorical column (PAD=0, OOV=1)
- ``time_features`` float32 [N, L, F] standardised (see ``TIME_FEATURES``)
- ``event_pos``     int32 [N, L]     events counted back from the most recent one (0 = most recent)
- ``session_pos``   int32 [N, L]     sessions counted back from the most recent session before the
                                     cutoff (0 = that session), clipped to ``max_sessions - 1``
- ``mask``          bool  [N, L]     True on real events

Positions are counted *back from the cutoff* rather than from the start of the journey
(``event_index``/``session_index`` in the frame): the start of a long journey is cut off by
``max_len``, so absolute indexes would make the same recent behaviour look different for users
with long and short pasts; counted back, "the last event of the current session" always has the
same (event, session) position pair, which is what the event-session position embedding learns.

Vocabularies and standardisation statistics are computed by ``fit`` from the positions the
training examples actually see (training data only) and saved with the model (``state_dict``).
Which columns become tokens is *declared*: ``EncoderConfig.attributes`` is an allow-list of
``AttributeRule`` (a frequency threshold, or hashing into a fixed number of buckets for high
cardinality), with defaults per event format in ``ATTRIBUTE_ALLOW_LISTS``. Identifiers and
numbers (session ids, transaction ids, prices) are not in any default: as tokens they are noise.

History: an example sees its user's events strictly before ``history_end`` when the examples
carry that column (the no-straddle rule of ``training_examples``: a session in progress at the
cutoff is not history), else before ``cutoff``. Recency is always measured to ``cutoff``.
Missing categorical values are a token of their own (``<missing>``): a page without a category is
informative. Everything is vectorised with numpy over a sorted frame: no python loop over events
or examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

PAD, OOV = 0, 1
MISSING = "<missing>"
TIME_FEATURES = (
    "log_seconds_since_prev_event",  # ln(1 + gap to the previous event)
    "log_seconds_since_session_start",
    "log_seconds_to_cutoff",  # ln(1 + seconds from the event to the cutoff): recency
    "hour_sin",
    "hour_cos",
    "day_of_week_sin",
    "day_of_week_cos",
)
SESSION_COLUMNS = (
    "session_index",
    "event_index",
    "log_seconds_since_prev_event",
    "log_seconds_since_session_start",
    "hour_of_day",
    "day_of_week",
)
# Columns of the sessionized frame that are not categorical event attributes.
NON_ATTRIBUTE_COLUMNS = frozenset(
    {
        "user_id",
        "event_time",
        "item_id",
        "source_file",
        "source_row",
        "ingested_at",
        "session_id",
        "event_index_in_session",
        "seconds_since_prev_event",
        "seconds_since_session_start",
        *SESSION_COLUMNS,
    }
)


@dataclass(frozen=True)
class AttributeRule:
    """One categorical column allowed into the model, and how its values become tokens."""

    column: str
    min_count: int = 1  # values seen fewer times in the training exposure map to OOV
    hash_buckets: int = 0  # > 0: md5 of the value modulo this many buckets (high cardinality), no OOV


_SIMULATOR_ATTRIBUTES = (
    AttributeRule("event_name"),
    AttributeRule("category", min_count=5),
    AttributeRule("device", min_count=5),
    AttributeRule("channel", min_count=5),
    AttributeRule("locale", min_count=5),
    AttributeRule("destination", min_count=5),
)
# Per event format (the names of TRACE_DAGSTER_EVENTS_FORMAT, plus the simulator). Columns a
# frame does not have are skipped; columns not listed never enter the model.
ATTRIBUTE_ALLOW_LISTS: dict[str, tuple[AttributeRule, ...]] = {
    "simulator": _SIMULATOR_ATTRIBUTES,
    "canonical": _SIMULATOR_ATTRIBUTES,  # the canonical format's usual attributes; declare others
    # thousands of category ids with a long tail: hashed, so rare ones still get a (shared) token
    "taobao": (AttributeRule("event_name"), AttributeRule("category", hash_buckets=1024)),
    # price is a number and user_session an id: neither is a token
    "rees46": (
        AttributeRule("event_name"),
        AttributeRule("category", min_count=5),
        AttributeRule("category_id", hash_buckets=1024),
        AttributeRule("brand", min_count=10),
    ),
    # transactionid is an id (one value per purchase): never a token
    "retailrocket": (AttributeRule("event_name"), AttributeRule("category", min_count=5)),
}


def attribute_rules_for(event_format: str) -> tuple[AttributeRule, ...]:
    try:
        return ATTRIBUTE_ALLOW_LISTS[event_format]
    except KeyError:
        raise ValueError(
            f"no attribute allow-list for format {event_format!r}; known: {sorted(ATTRIBUTE_ALLOW_LISTS)}"
        ) from None


@dataclass
class EncoderConfig:
    max_len: int = 128
    max_sessions: int = 32  # session positions beyond this are clipped into the last one
    min_count: int = 1  # rarer categorical values map to OOV
    last_session_only: bool = False  # myopic view: only the most recent session before the cutoff
    max_events: int | None = None  # a view: at most this many most recent events (1: the last page)
    # None: event_name, category and every attribute column found by ``fit`` (not item_id: its
    # cardinality is in the tens of thousands and TRACE embeds pages and their attributes).
    categorical_columns: tuple[str, ...] | None = None
    # The declared allow-list (takes precedence over categorical_columns and min_count); the
    # pipeline always passes one (attribute_rules_for(format)). Absent columns are skipped.
    attributes: tuple[AttributeRule, ...] | None = None


@dataclass
class Vocabulary:
    """Token -> id, with PAD=0 and OOV=1 reserved; tokens sorted by count (desc) then name."""

    tokens: list[str] = field(default_factory=list)
    hash_buckets: int = 0  # > 0: no token list, ids are 2 + md5(value) % hash_buckets

    def __len__(self) -> int:  # embedding-table size including PAD and OOV
        return (self.hash_buckets if self.hash_buckets else len(self.tokens)) + 2

    def ids(self, values: np.ndarray) -> np.ndarray:
        if self.hash_buckets:
            codes, uniques = pd.factorize(np.asarray(values, dtype=object))
            buckets = np.array(
                [int(hashlib.md5(str(u).encode()).hexdigest()[:12], 16) % self.hash_buckets for u in uniques],
                dtype=np.int64,
            )
            return (buckets[codes] + 2).astype(np.int32) if len(uniques) else np.full(len(codes), OOV, np.int32)
        ids = [*map(self._lookup().get, values)]  # None where a value is not a token as it is
        if None in ids:
            ids = [self._id_of_other(v) if i is None else i for v, i in zip(values, ids)]
        return np.array(ids, dtype=np.int32)

    def _lookup(self) -> dict:
        """Token -> id, cached: a dict lookup per value beats pd.Index.get_indexer on object
        arrays at every size (~10x on a request's 128 values, ~3x on a million). None (a missing
        attribute in a request) is a key too: it is the MISSING token, as `_as_strings` makes it."""
        cached = getattr(self, "_token_ids", None)
        if cached is None or cached[0] is not self.tokens or cached[1] != len(self.tokens):
            ids = {token: i + 2 for i, token in enumerate(self.tokens)}
            if MISSING in ids:
                ids[None] = ids[MISSING]
            cached = self._token_ids = (self.tokens, len(self.tokens), ids)
        return cached[2]

    def _id_of_other(self, value) -> int:
        """Id of a value that is not a token as it is: a token once made a string like
        `_as_strings` does (NaN/NA -> MISSING, 3 -> "3"), else OOV (any other string)."""
        if isinstance(value, str):
            return OOV
        return self._lookup().get(MISSING if pd.isna(value) else str(value), OOV)

    @classmethod
    def from_counts(cls, values: np.ndarray, counts: np.ndarray, min_count: int) -> Vocabulary:
        keep = counts >= min_count
        values, counts = values[keep], counts[keep]
        order = np.lexsort((values.astype(str), -counts))
        return cls([str(v) for v in values[order]])


def _as_strings(col: pd.Series) -> np.ndarray:
    """Categorical values as python strings (object array); nulls become the MISSING token."""
    if isinstance(col.dtype, pd.CategoricalDtype):  # fast path: convert the categories only
        cats = np.append(col.cat.categories.astype(str).to_numpy(dtype=object), MISSING)
        codes = col.cat.codes.to_numpy()
        return cats[np.where(codes < 0, len(cats) - 1, codes)]
    out = col.astype(object).to_numpy(copy=True)
    out[pd.isna(out)] = MISSING
    return out.astype(str).astype(object)


def _factorize(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes, distinct values as strings) of a categorical column, MISSING for nulls; a
    pandas Categorical (the simulator's columns) is used as is, without touching its rows."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = np.append(col.cat.categories.astype(str).to_numpy(dtype=object), MISSING)
        codes = col.cat.codes.to_numpy().astype(np.int64)
        return np.where(codes < 0, len(cats) - 1, codes), cats
    codes, uniques = pd.factorize(_as_strings(col))
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _utc_ns(values) -> np.ndarray:
    """Timestamps (naive = UTC, or tz-aware) -> int64 nanoseconds since the epoch."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "M":  # `sessionize_user`'s times
        return values.astype("datetime64[ns]").view(np.int64)
    s = values if isinstance(values, pd.Series) else pd.Series(values)
    if isinstance(s.dtype, pd.DatetimeTZDtype):  # fast path: already an instant
        return s.array.as_unit("ns").asi8
    if np.issubdtype(s.dtype, np.datetime64):  # naive means UTC
        return s.to_numpy().astype("datetime64[ns]").view(np.int64)
    t = pd.to_datetime(s, utc=True)
    return t.array.as_unit("ns").asi8


@dataclass
class PreparedEvents:
    """A sessionized frame indexed once for encoding, reusable across example chunks.

    The frame itself is neither copied nor reordered: ``order`` maps sorted positions (user,
    time, event_index) to its rows, and the arrays below are already in sorted order.
    """

    frame: pd.DataFrame | dict[str, np.ndarray]  # the caller's frame (untouched), or one user's arrays
    order: np.ndarray  # int64 [n_events]: sorted position -> frame row
    users: pd.Index  # distinct user ids (strings); a user's code is its position here
    user_offsets: np.ndarray  # int64 [n_users + 1]: user u owns sorted rows [offsets[u], offsets[u+1])
    time_ns: np.ndarray  # int64 [n_events], sorted
    session_index: np.ndarray  # int64 [n_events], sorted
    session_first: np.ndarray  # int64 [n_events]: first sorted row of each event's session

    def __len__(self) -> int:
        return len(self.order)

    def values(self, column: str, rows: np.ndarray, dtype=np.float64) -> np.ndarray:
        """Numeric column at sorted ``rows`` (any shape)."""
        return np.asarray(self.frame[column], dtype=dtype)[self.order[rows]]

    def columns(self) -> list[str]:
        return list(self.frame)


@dataclass
class _Windows:
    """Row ranges into the sorted events: example i sees sorted rows [start[i], end[i])."""

    events: PreparedEvents
    start: np.ndarray  # int64 [N]
    end: np.ndarray  # int64 [N]
    cutoff_ns: np.ndarray  # int64 [N]
    rows: np.ndarray  # int64 [N, L] sorted row of each position (0 where padded)
    mask: np.ndarray  # bool [N, L]


def prepare_events(events: pd.DataFrame) -> PreparedEvents:
    """Index a sessionized frame by user and time (done once per frame)."""
    missing = [c for c in ("user_id", "event_time", "event_name", *SESSION_COLUMNS) if c not in events.columns]
    if missing:
        raise ValueError(f"events lack the sessionized columns {missing} (see docs/ARCHITECTURE.md)")
    codes, users = _factorize(events["user_id"])
    # users in sorted order so that codes are comparable across frames
    rank = np.argsort(np.argsort(users.astype(str), kind="stable"), kind="stable")
    codes, users = rank[codes], np.sort(users.astype(str)).astype(object)
    time_ns = _utc_ns(events["event_time"])
    order = np.lexsort((events["event_index"].to_numpy(), time_ns, codes))
    codes, time_ns = codes[order], time_ns[order]
    sess = events["session_index"].to_numpy(np.int64)[order]
    n = len(order)
    new_session = np.ones(n, bool)
    new_session[1:] = (codes[1:] != codes[:-1]) | (sess[1:] != sess[:-1])
    session_first = np.maximum.accumulate(np.where(new_session, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    # users without events (unused categories) get an empty range
    offsets = np.searchsorted(codes, np.arange(len(users) + 1), side="left").astype(np.int64)
    return PreparedEvents(
        events, order.astype(np.int64), pd.Index(users, dtype=object), offsets, time_ns, sess, session_first
    )


_ONE_USER = pd.Index([""], dtype=object)  # `transform_user`'s user index (an Index is immutable)


def _first_not_before(time_ns: np.ndarray, lo: np.ndarray, hi: np.ndarray, cutoff: np.ndarray) -> np.ndarray:
    """Per example, the first row in [lo, hi) whose time is >= cutoff (hi if none): a binary
    search vectorised across examples (rows in each range are sorted by time)."""
    lo, hi = lo.copy(), hi.copy()
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        before = time_ns[np.where(active, mid, 0)] < cutoff
        lo = np.where(active & before, mid + 1, lo)
        hi = np.where(active & ~before, mid, hi)


class SequenceEncoder:
    def __init__(self, config: EncoderConfig | None = None):
        self.config = config or EncoderConfig()
        self.columns: tuple[str, ...] = ()
        self.vocabularies: dict[str, Vocabulary] = {}
        self.time_mean = np.zeros(len(TIME_FEATURES), dtype=np.float32)
        self.time_std = np.ones(len(TIME_FEATURES), dtype=np.float32)
        self.fitted = False
        self._lut_cache: dict = {}

    # ------------------------------------------------------------------ sizes for the models
    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(len(self.vocabularies[c]) for c in self.columns)

    @property
    def n_time_features(self) -> int:
        return len(TIME_FEATURES)

    # ------------------------------------------------------------------ windows
    def _windows(self, events: pd.DataFrame | PreparedEvents, examples: pd.DataFrame) -> _Windows:
        ev = events if isinstance(events, PreparedEvents) else prepare_events(events)
        missing = [c for c in ("user_id", "cutoff") if c not in examples.columns]
        if missing:
            raise ValueError(f"examples lack the columns {missing}: expected (user_id, cutoff) rows")
        code = ev.users.get_indexer(_as_strings(examples["user_id"]))  # -1: user without events
        known = code >= 0
        safe = np.where(known, code, 0)
        first = np.where(known, ev.user_offsets[safe], 0)
        last = np.where(known, ev.user_offsets[np.minimum(safe + 1, len(ev.user_offsets) - 1)], 0)
        cutoff = _utc_ns(examples["cutoff"])
        # events strictly before the history end (no-straddle rule) or the cutoff
        history_end = (
            np.minimum(_utc_ns(examples["history_end"]), cutoff) if "history_end" in examples.columns else cutoff
        )
        end = _first_not_before(ev.time_ns, first, last, history_end)
        return self._window_rows(ev, first, end, cutoff)

    def _window_rows(self, ev: PreparedEvents, first: np.ndarray, end: np.ndarray, cutoff: np.ndarray) -> _Windows:
        """Windows from each example's first user row and exclusive end row."""
        max_len = self.config.max_len
        span = max_len if self.config.max_events is None else min(max_len, self.config.max_events)
        start = np.maximum(first, end - span)
        if self.config.last_session_only and len(ev):
            has = end > start
            start = np.where(has, np.maximum(start, ev.session_first[np.where(has, end - 1, 0)]), start)

        rows = start[:, None] + np.arange(max_len)[None, :]  # [N, L]
        mask = rows < end[:, None]
        rows = np.where(mask, rows, 0)
        return _Windows(ev, start, end, cutoff, rows, mask)

    # ------------------------------------------------------------------ fit / transform
    def fit(
        self, events: pd.DataFrame | PreparedEvents, examples: pd.DataFrame, chunk_size: int = 16384
    ) -> SequenceEncoder:
        """Vocabularies and time statistics from the events the training examples see."""
        return self.fit_parts([(events, examples)], chunk_size)

    def fit_parts(self, parts, chunk_size: int = 16384) -> SequenceEncoder:
        """``fit`` over (events, examples) parts that partition the users, e.g. user-hash buckets
        read one at a time from the warehouse: only one part is in memory at once, and the result
        equals ``fit`` on their union (counts and sums add up across parts)."""
        token_counts: dict[str, dict[str, int]] = {}
        n_pos, total, total_sq = 0, np.zeros(len(TIME_FEATURES)), np.zeros(len(TIME_FEATURES))
        for events, examples in parts:
            ev = events if isinstance(events, PreparedEvents) else prepare_events(events)
            if not token_counts:
                self.columns = tuple(self._categorical_columns(list(ev.frame.columns)))
                token_counts = {c: {} for c in self.columns}
            codes = {}
            for c in self.columns:
                code, uniques = _factorize(ev.frame[c])
                codes[c] = (code[ev.order], uniques)  # codes in sorted order
            counts = {c: np.zeros(len(u), np.int64) for c, (_, u) in codes.items()}
            for lo in range(0, len(examples), chunk_size):
                w = self._windows(ev, examples.iloc[lo : lo + chunk_size])
                seen_rows = w.rows[w.mask]  # one entry per (example, position): the training exposure
                for c, (code, uniques) in codes.items():
                    counts[c] += np.bincount(code[seen_rows], minlength=len(uniques))
                raw = self._raw_time_features(w)[w.mask]  # [positions, F]
                n_pos += len(raw)
                total += raw.sum(0)
                total_sq += (raw**2).sum(0)
            for c, (_, uniques) in codes.items():
                merged = token_counts[c]
                for token, n in zip(uniques, counts[c].tolist()):
                    merged[str(token)] = merged.get(str(token), 0) + n
        self._lut_cache.clear()
        self.vocabularies = {}
        for c, tc in token_counts.items():
            rule = self._rules().get(c, AttributeRule(c, min_count=self.config.min_count))
            self.vocabularies[c] = (
                Vocabulary(hash_buckets=rule.hash_buckets)
                if rule.hash_buckets
                else Vocabulary.from_counts(
                    np.asarray(list(tc), dtype=object), np.asarray(list(tc.values()), np.int64), rule.min_count
                )
            )
        if n_pos:
            mean = total / n_pos
            std = np.sqrt(np.maximum(total_sq / n_pos - mean**2, 0.0))
            self.time_mean = mean.astype(np.float32)
            self.time_std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        self.fitted = True
        return self

    def event_columns(self, available: list[str]) -> list[str]:
        """The columns of ``available`` (an events frame's, in its order) that ``fit`` and
        ``transform`` read: the sessionized columns and the categorical ones this config picks
        from them. A caller that reads events for this encoder need read no others (the rest of
        `sessionized_events`, e.g. ids and raw gaps, cost time to read and convert)."""
        read = {"user_id", "event_time", "event_name", *SESSION_COLUMNS}
        read |= set(self._categorical_columns(available))
        return [c for c in available if c in read]

    def _rules(self) -> dict[str, AttributeRule]:
        return {r.column: r for r in self.config.attributes or ()}

    def _categorical_columns(self, available: Sequence[str]) -> list[str]:
        """The categorical columns this config encodes, of an events frame's columns ``available``."""
        if self.config.attributes is not None:  # the declared allow-list; absent columns are skipped
            cols = [r.column for r in self.config.attributes if r.column in available]
            if "event_name" not in cols:
                raise ValueError("the attribute allow-list must contain event_name (the page)")
            return cols
        if self.config.categorical_columns is None:
            attrs = [c for c in available if c not in NON_ATTRIBUTE_COLUMNS and c not in ("event_name", "category")]
            return ["event_name", *(["category"] if "category" in available else []), *attrs]
        cols = list(self.config.categorical_columns)
        absent = [c for c in cols if c not in available]
        if absent:
            raise ValueError(f"categorical columns {absent} are not in the events frame")
        return cols

    def _raw_time_features(self, w: _Windows) -> np.ndarray:
        """Unstandardised time features [N, L, F] (padded positions hold garbage, masked later)."""
        ev, rows = w.events, w.rows
        if len(ev) == 0:
            return np.zeros((*rows.shape, len(TIME_FEATURES)))
        log_prev = ev.values("log_seconds_since_prev_event", rows)
        if self.config.last_session_only:
            # the first event of the window would reveal the gap to the (hidden) previous session
            log_prev = np.where(rows == w.start[:, None], 0.0, log_prev)
        log_sess = ev.values("log_seconds_since_session_start", rows)
        to_cutoff = np.log1p(np.maximum(w.cutoff_ns[:, None] - ev.time_ns[rows], 0) / 1e9)
        hour = ev.values("hour_of_day", rows) * (2 * np.pi / 24)
        dow = ev.values("day_of_week", rows) * (2 * np.pi / 7)
        return np.stack([log_prev, log_sess, to_cutoff, np.sin(hour), np.cos(hour), np.sin(dow), np.cos(dow)], axis=-1)

    def transform(
        self, events: pd.DataFrame | PreparedEvents, examples: pd.DataFrame, chunk_size: int = 16384
    ) -> dict[str, Tensor]:
        """Tensors for ``examples`` (same row order), see the module docstring. Pass a
        ``PreparedEvents`` to encode several example sets against one frame without re-sorting."""
        if not self.fitted:
            raise RuntimeError("SequenceEncoder.transform before fit (or from_state_dict)")
        ev = events if isinstance(events, PreparedEvents) else prepare_events(events)
        if len(examples) <= chunk_size:
            return self._transform_chunk(ev, examples)
        chunks = [
            self._transform_chunk(ev, examples.iloc[lo : lo + chunk_size]) for lo in range(0, len(examples), chunk_size)
        ]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    def transform_user(self, user_events: pd.DataFrame | dict[str, np.ndarray], cutoff) -> dict[str, Tensor]:
        """Tensors [1, L, ...] for one user's events as of ``cutoff`` (naive = UTC): the serving
        path, equal to ``transform`` of the single example but without indexing users.

        ``user_events``: a sessionized frame, or its columns as arrays (``sessionize_user``):
        only the rows the window sees are looked up in the vocabularies.
        """
        if not self.fitted:
            raise RuntimeError("SequenceEncoder.transform_user before fit (or from_state_dict)")
        missing = [c for c in ("event_time", *SESSION_COLUMNS) if c not in user_events]
        if missing:
            raise ValueError(f"events lack the sessionized columns {missing} (see docs/ARCHITECTURE.md)")
        time_ns = _utc_ns(user_events["event_time"])
        order = np.lexsort((np.asarray(user_events["event_index"]), time_ns))
        n = len(order)
        sess = np.asarray(user_events["session_index"], dtype=np.int64)[order]
        new_session = np.ones(n, bool)
        new_session[1:] = sess[1:] != sess[:-1]
        session_first = np.maximum.accumulate(np.where(new_session, np.arange(n), 0)) if n else np.zeros(0, np.int64)
        ev = PreparedEvents(user_events, order, _ONE_USER, np.array([0, n]), time_ns[order], sess, session_first)
        cutoff_ns = np.array([pd.Timestamp(cutoff).value])  # ns since the epoch, naive = UTC
        end = np.searchsorted(ev.time_ns, cutoff_ns, side="left").astype(np.int64)
        return self._encode(self._window_rows(ev, np.zeros(1, np.int64), end, cutoff_ns))

    def _transform_chunk(self, ev: PreparedEvents, examples: pd.DataFrame) -> dict[str, Tensor]:
        return self._encode(self._windows(ev, examples))

    def _encode(self, w: _Windows) -> dict[str, Tensor]:
        ev = w.events
        mask = w.mask
        n, max_len = mask.shape
        cat = np.zeros((n, max_len, len(self.columns)), dtype=np.int32)
        if n == 1:  # one example (a served user): its window is the sorted rows [start, end), left-aligned
            frame_rows = ev.order[w.start[0] : max(w.start[0], w.end[0])]
            for j, c in enumerate(self.columns):
                cat[0, : len(frame_rows), j] = self._column_ids(c, ev.frame[c], frame_rows)
        elif len(used := np.unique(w.rows[mask])):  # only rows some example sees (serving frames hold more)
            compact = np.minimum(np.searchsorted(used, w.rows), len(used) - 1)
            frame_rows = ev.order[used]
            for j, c in enumerate(self.columns):
                ids = self._column_ids(c, ev.frame[c], frame_rows)
                cat[:, :, j] = np.where(mask, ids[compact], PAD)
        time = (self._raw_time_features(w) - self.time_mean) / self.time_std
        time = np.where(mask[..., None], time, 0.0).astype(np.float32)

        event_pos = np.where(mask, (w.end[:, None] - 1) - (w.start[:, None] + np.arange(max_len)), 0)
        if len(ev):
            sess = ev.session_index
            session_pos = sess[np.maximum(w.end - 1, 0)][:, None] - sess[w.rows]
            session_pos = np.where(mask, np.clip(session_pos, 0, self.config.max_sessions - 1), 0)
        else:
            session_pos = np.zeros_like(event_pos)
        return {
            "cat_ids": torch.from_numpy(cat),
            "time_features": torch.from_numpy(time),
            "event_pos": torch.from_numpy(event_pos.astype(np.int32)),
            "session_pos": torch.from_numpy(session_pos.astype(np.int32)),
            "mask": torch.from_numpy(mask),
        }

    def _column_ids(self, name: str, col: pd.Series | np.ndarray, frame_rows: np.ndarray) -> np.ndarray:
        """Vocabulary ids of ``col`` at ``frame_rows``. A Categorical is looked up once per
        category, and the lookup table is cached per dtype (serving calls reuse the dtype of
        the frame they slice, so a request pays only for an integer gather)."""
        vocab = self.vocabularies[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            key = (name, id(col.dtype))
            cached = self._lut_cache.get(key)
            if cached is None or cached[0] is not col.dtype:  # holding the dtype keeps its id unique
                if len(self._lut_cache) > 256:
                    self._lut_cache.clear()
                cats = np.append(col.cat.categories.astype(str).to_numpy(dtype=object), MISSING)
                cached = self._lut_cache[key] = (col.dtype, vocab.ids(cats))
            lut = cached[1]
            codes = col.array.codes[frame_rows]  # the Categorical's codes: no Series built
            return lut[np.where(codes < 0, len(lut) - 1, codes)]
        values = col.iloc[frame_rows].to_numpy(object) if isinstance(col, pd.Series) else col[frame_rows]
        return vocab.ids(_as_strings(pd.Series(values)) if vocab.hash_buckets else values)

    def fit_transform(self, events: pd.DataFrame, examples: pd.DataFrame) -> dict[str, Tensor]:
        ev = prepare_events(events)
        return self.fit(ev, examples).transform(ev, examples)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Primitives only, so the artifact loads with ``torch.load(weights_only=True)``."""
        cfg = asdict(self.config)
        cfg["categorical_columns"] = None if cfg["categorical_columns"] is None else list(cfg["categorical_columns"])
        cfg["attributes"] = None if self.config.attributes is None else [asdict(r) for r in self.config.attributes]
        return {
            "config": cfg,
            "columns": list(self.columns),
            "vocabularies": {
                c: {"hash_buckets": v.hash_buckets} if v.hash_buckets else list(v.tokens)
                for c, v in self.vocabularies.items()
            },
            "time_mean": [float(x) for x in self.time_mean],
            "time_std": [float(x) for x in self.time_std],
            "time_features": list(TIME_FEATURES),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> SequenceEncoder:
        if tuple(state["time_features"]) != TIME_FEATURES:
            raise ValueError(
                f"artifact was encoded with time features {state['time_features']}, this code has {TIME_FEATURES}"
            )
        cfg = dict(state["config"])
        if cfg["categorical_columns"] is not None:
            cfg["categorical_columns"] = tuple(cfg["categorical_columns"])
        if cfg.get("attributes") is not None:
            cfg["attributes"] = tuple(AttributeRule(**r) for r in cfg["attributes"])
        enc = cls(EncoderConfig(**cfg))
        enc.columns = tuple(state["columns"])
        enc.vocabularies = {
            c: Vocabulary(hash_buckets=int(t["hash_buckets"])) if isinstance(t, dict) else Vocabulary(list(t))
            for c, t in state["vocabularies"].items()
        }
        enc.time_mean = np.asarray(state["time_mean"], dtype=np.float32)
        enc.time_std = np.asarray(state["time_std"], dtype=np.float32)
        enc.fitted = True
        return enc


__all__ = [
    "ATTRIBUTE_ALLOW_LISTS",
    "MISSING",
    "OOV",
    "PAD",
    "TIME_FEATURES",
    "AttributeRule",
    "EncoderConfig",
    "PreparedEvents",
    "SequenceEncoder",
    "Vocabulary",
    "attribute_rules_for",
    "prepare_events",
]
