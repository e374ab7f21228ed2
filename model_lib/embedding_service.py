"""The deployable unit of the TRACE family: encoder + network, trained, saved, served as one.

``UserModel`` is what the workflow trains (``UserModel.train``), logs (``save`` -> one artifact
file, see artifact.py), evaluates (``evaluate``) and serves: ``embed`` / ``predict_proba`` for
batches of (user_id, cutoff) examples, and ``embed_user`` for one user's events in real time.
Inference runs under ``torch.inference_mode`` in eval mode; it is deterministic, and padding
never changes a result.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from model_lib import serving_graph
from model_lib.artifact import load_artifact, save_artifact
from model_lib.distributed import fit_distributed
from model_lib.encoding import EncoderConfig, PreparedEvents, SequenceEncoder, prepare_events
from model_lib.metrics import auprc, auroc
from model_lib.sequence_shards import ShardedExamples
from model_lib.serving_graph import export as _export_serving_graph  # (`save`'s flag has the module's name)
from model_lib.sessionize import (
    DEFAULT_SESSION_GAP_SECONDS,
    InvalidEventsError,
    parse_event_times,
    sessionize,
    sessionize_user,
)
from model_lib.trace import SequenceUserModel
from model_lib.trace_baselines import build_model, encoder_config_for, make_config
from model_lib.training import EpochReport, FitResult, TrainConfig, fit, iterate_batches, set_seed

try:  # pandas' block API (what pyarrow builds frames with): `_answer_frame`'s fast route
    from pandas.arrays import DatetimeArray as _DatetimeArray
    from pandas.core.internals import BlockManager as _BlockManager
    from pandas.core.internals.api import make_block as _make_block
except ImportError:  # pragma: no cover - another pandas: the public constructor
    _BlockManager = _make_block = None


def labels_tensor(examples: pd.DataFrame, label_columns: Sequence[str]) -> Tensor:
    """Label columns (bool/0-1, nullable) -> float32 [N, T] with NaN for missing."""
    missing = [c for c in label_columns if c not in examples.columns]
    if missing:
        raise ValueError(f"examples lack the label columns {missing}")
    values = examples[list(label_columns)].astype("Float64").to_numpy(dtype=np.float32, na_value=np.nan)
    return torch.from_numpy(values)


log = logging.getLogger(__name__)

#: Prefix of the probability columns of `score_events` (`p_<task>`, as in predictions.parquet).
PROBABILITY_PREFIX = "p_"


def task_of(label_column: str) -> str:
    """`label_checkout` -> `checkout`: the task set's name of a label column."""
    return label_column.removeprefix("label_")


@dataclass
class UserModel:
    kind: str  # "trace", "myopic", "vanilla_transformer" or "lstm"
    model: SequenceUserModel
    encoder: SequenceEncoder
    # The inactivity gap of the sessions the model was trained on: raw events are cut the same way.
    session_gap_seconds: float = DEFAULT_SESSION_GAP_SECONDS
    # The network's one-user forward as ONNX (serving_graph.py), as stored with these weights in
    # their artifact; run by ONNX Runtime once the model is frozen for serving.
    serving_graph: bytes | None = field(default=None, repr=False, compare=False)
    # (network, its modules) of `_eval_mode`: the network's module tree, listed once
    _modules: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # the ONNX Runtime session of `serving_graph` while frozen (`freeze`), else None
    _session: serving_graph.ServingSession | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.model.config.task_names)

    @property
    def embedding_dim(self) -> int:
        return self.model.config.embedding_dim

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        kind: str,
        events: pd.DataFrame | PreparedEvents,
        train_examples: pd.DataFrame,
        valid_examples: pd.DataFrame,
        label_columns: Sequence[str],
        *,
        encoder_config: EncoderConfig | None = None,
        model_overrides: dict | None = None,
        train_config: TrainConfig | None = None,
        on_epoch: Callable[[EpochReport], None] | None = None,
        checkpoint_path: str | Path | None = None,
    ) -> tuple[UserModel, FitResult]:
        """Fit the encoder on the training examples, then the network with ``training.fit``.

        ``events`` must hold the (sessionized) histories of both example sets; only events before
        each example's cutoff are ever read. Task names are the label column names.
        """
        train_config = train_config or TrainConfig()
        ev = events if isinstance(events, PreparedEvents) else prepare_events(events)
        encoder = SequenceEncoder(encoder_config_for(kind, encoder_config)).fit(ev, train_examples)
        train = {**encoder.transform(ev, train_examples), "labels": labels_tensor(train_examples, label_columns)}
        valid = {**encoder.transform(ev, valid_examples), "labels": labels_tensor(valid_examples, label_columns)}
        set_seed(train_config.seed)  # initial weights are part of the run's reproducibility
        model = build_model(kind, make_config(kind, encoder, label_columns, **(model_overrides or {})))
        model.set_class_weights(train["labels"])
        result = fit(model, train, valid, train_config, on_epoch=on_epoch, checkpoint_path=checkpoint_path)
        return cls(kind, model, encoder), result

    @classmethod
    def train_on_shards(
        cls,
        kind: str,
        encoder: SequenceEncoder,
        train: ShardedExamples,
        valid: ShardedExamples,
        label_columns: Sequence[str],
        *,
        model_overrides: dict | None = None,
        train_config: TrainConfig | None = None,
        on_epoch: Callable[[EpochReport], None] | None = None,
        checkpoint_path: str | Path | None = None,
        processes: int = 1,
    ) -> tuple[UserModel, FitResult]:
        """``train`` on examples already encoded to shards (``encoder`` fitted on the training
        examples): read batch by batch from disk, so memory is bounded by the batch size.

        ``processes > 1``: DistributedDataParallel over that many worker processes
        (``distributed.fit_distributed``); epochs are then reported when training ends, and a
        retried step starts over (no checkpoint).
        """
        train_config = train_config or TrainConfig()
        set_seed(train_config.seed)
        config = make_config(kind, encoder, label_columns, **(model_overrides or {}))
        model = build_model(kind, config)
        model.set_class_weights(torch.from_numpy(train.column("labels")).reshape(-1, len(label_columns)))
        if processes > 1:
            result = fit_distributed(model, build_model, (kind, config), train, valid, train_config, processes)
            for report in result.history if on_epoch is not None else ():
                on_epoch(report)
        else:
            result = fit(model, train, valid, train_config, on_epoch=on_epoch, checkpoint_path=checkpoint_path)
        return cls(kind, model, encoder), result

    # ------------------------------------------------------------------ inference
    def freeze(self) -> UserModel:
        """Fixed for serving (what the registered model does on load): see
        `SequenceUserModel.freeze`, and one-user requests run on the artifact's serving graph
        (ONNX Runtime) when it has one, after a check against the PyTorch forward. Results are
        unchanged up to float rounding; a request no longer copies the embedding tables, nor
        pays PyTorch's per-operator dispatch."""
        self.model.freeze()
        if self.serving_graph is not None and self._session is None:
            if not serving_graph.runtime_available():
                log.warning("onnxruntime is not installed: one-user requests run on PyTorch")
            else:
                try:
                    session = serving_graph.ServingSession(self.serving_graph)
                    serving_graph.check(session, self.model)  # one session, checked, then kept
                    self._session = session
                except Exception as error:  # PyTorch serves the same numbers
                    log.warning("serving graph not used (%s): one-user requests run on PyTorch", error)
        return self

    @property
    def serving_runtime(self) -> str:
        """What runs a one-user request's network: "onnxruntime" (frozen with a serving graph)
        or "torch"."""
        return "onnxruntime" if self._session is not None else "torch"

    def _eval_mode(self) -> None:
        """The network in eval mode (no dropout). `eval()` walks and sets every module (~0.15 ms,
        a tenth of a request's forward): skipped when all already are, as after the first call.
        Walking the module tree to find out costs ~0.04 ms too: its list is kept per network
        (a network's modules are fixed at construction)."""
        if self._modules is None or self._modules[0] is not self.model:
            self._modules = (self.model, tuple(self.model.modules()))
        if any(m.training for m in self._modules[1]):
            self.model.eval()

    @torch.inference_mode()
    def _run(
        self, batch_tensors: dict[str, Tensor], fn: Callable[[dict[str, Tensor]], Tensor], batch_size: int
    ) -> np.ndarray:
        self._eval_mode()
        outs = [fn(b) for b in iterate_batches(batch_tensors, batch_size)]
        if not outs:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.cat(outs).numpy()

    def embed(
        self, events: pd.DataFrame | PreparedEvents, examples: pd.DataFrame, batch_size: int = 2048
    ) -> np.ndarray:
        """User embeddings float32 [N, E], one row per example (user as of its cutoff)."""
        out = self._run(self.encoder.transform(events, examples), self.model.embed, batch_size)
        return out.reshape(len(examples), self.embedding_dim)

    @torch.inference_mode()
    def embed_shards(self, examples: ShardedExamples, batch_size: int = 2048) -> Iterator[tuple[dict, Tensor]]:
        """(batch, user embeddings [B, E]) of examples already encoded to shards, one batch at a
        time: inference whose memory is bounded by the batch, not by the examples."""
        self._eval_mode()
        for batch in examples.batches(batch_size):
            yield batch, self.model.embed(batch)

    def predict_proba(
        self, events: pd.DataFrame | PreparedEvents, examples: pd.DataFrame, batch_size: int = 2048
    ) -> pd.DataFrame:
        """Probability per task, one column per task name, index aligned with ``examples``."""
        return self.proba_from_embeddings(self.embed(events, examples, batch_size), index=examples.index)

    def proba_from_embeddings(self, embeddings: np.ndarray, index: pd.Index | None = None) -> pd.DataFrame:
        """Task probabilities of users already embedded: the heads on the embedding (forward = heads(embed)).

        Callers that need both embeddings and probabilities encode once and call this.
        """
        return pd.DataFrame(self._probabilities(embeddings), columns=list(self.task_names), index=index)

    @torch.inference_mode()
    def _probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 [N, T]: `proba_from_embeddings` without the frame (a request's scores). The
        heads are one Linear: train and eval mode compute the same, no switch needed."""
        logits = self.model.heads(
            torch.as_tensor(np.asarray(embeddings, dtype=np.float32).reshape(-1, self.embedding_dim))
        )
        return torch.sigmoid(logits).numpy()

    def embed_user(self, user_events: pd.DataFrame, as_of=None) -> np.ndarray:
        """Embedding [E] of one user from their sessionized events (real-time serving).

        ``as_of``: the moment of the request (events at or after it are ignored); default now,
        which is what a live request means. Pass it explicitly for reproducible results.
        """
        if "user_id" in user_events.columns and user_events["user_id"].nunique() > 1:
            raise ValueError("embed_user takes the events of exactly one user")
        cutoff = pd.Timestamp.now(tz="UTC") if as_of is None else pd.Timestamp(as_of)
        return self._embed_sequence(self.encoder.transform_user(user_events, cutoff))[0]

    def _embed_sequence(self, batch: dict[str, Tensor]) -> np.ndarray:
        """Embedding [1, E] of one encoded sequence [1, L, ...], its trailing padding dropped:
        padding is masked everywhere (attention keys, max pooling, LSTM lengths), so the numbers
        are the same, and a user with 50 events does not pay for ``max_len`` positions."""
        return self._score_sequence(batch, heads=False)[0]

    def _score_sequence(self, batch: dict[str, Tensor], heads: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(embedding [1, E], probabilities [1, T] or None) of one encoded sequence: the heads
        run on the embedding tensor in the same pass (what `_probabilities` computes from it)."""
        length = max(int(batch["mask"].numpy().sum()), 1)  # an empty history keeps its one (padding) slot
        if self._session is not None:  # frozen for serving: the same network on ONNX Runtime (no autograd)
            embedding, proba = self._session.run(batch, length)
            return embedding, proba if heads else None
        with torch.inference_mode():
            self._eval_mode()
            if length < batch["mask"].shape[1]:
                batch = {k: v[:, :length] for k, v in batch.items()}
            embedding = self.model.embed(batch)
            proba = torch.sigmoid(self.model.heads(embedding)).numpy() if heads else None
            return embedding.numpy(), proba

    def embed_latest(self, events: pd.DataFrame, batch_size: int = 2048, as_of=None) -> pd.DataFrame:
        """Every user's embedding as of one moment: the serving entry point.

        A frame of sessionized events of any number of users in, one row per user out
        (``user_id``, ``embedding_0..``). The registered model serves ``score_events``.
        All users share one cutoff, ``as_of`` (default: 1 s after the latest event of the frame),
        as all users of a training example set share a cutoff: recency is then the time from each
        user's events to that moment, the quantity training saw (a cutoff 1 s after each user's
        own last event gave every user a recency of 1 s, a value training never had).
        """
        columns = ["user_id"] + [f"embedding_{i}" for i in range(self.embedding_dim)]
        if events.empty:
            return pd.DataFrame(columns=columns)
        times = pd.to_datetime(events["event_time"], utc=True)
        cutoff = times.max() + pd.Timedelta(seconds=1) if as_of is None else pd.Timestamp(as_of)
        users = np.sort(events["user_id"].astype(str).unique())
        examples = pd.DataFrame({"user_id": users, "cutoff": cutoff})
        vectors = self.embed(events.assign(user_id=events["user_id"].astype(str)), examples, batch_size)
        return pd.DataFrame(np.column_stack([examples["user_id"].to_numpy(object), vectors]), columns=columns).astype(
            {c: "float32" for c in columns[1:]}
        )

    # ------------------------------------------------------------------ serving raw events
    @property
    def probability_columns(self) -> list[str]:
        return [PROBABILITY_PREFIX + task_of(t) for t in self.task_names]

    @property
    def known_event_names(self) -> frozenset[str] | None:
        """Event names seen in training (None when the encoder has no event_name vocabulary)."""
        vocab = self.encoder.vocabularies.get("event_name")
        return None if vocab is None else frozenset(vocab.tokens)

    def as_sessionized(self, events: pd.DataFrame, unknown_event_names: str = "reject") -> pd.DataFrame:
        """Raw canonical events (or already sessionized ones, kept as they are) -> sessionized frame.

        `unknown_event_names`: "reject" raises `InvalidEventsError` on names the model never saw
        in training (a live request with a typo), "keep" lets them map to the OOV token.
        """
        self._check_event_names(events, unknown_event_names)
        if all(c in events.columns for c in SESSIONIZED_INPUT_COLUMNS):
            frame = events.copy()
            frame["event_time"] = parse_event_times(frame["event_time"])
            frame["user_id"] = frame["user_id"].astype(str)
        else:
            frame = sessionize(events, self.session_gap_seconds)
        absent = [c for c in self.encoder.columns if c not in frame.columns]
        if absent:  # optional attributes a request leaves out: missing values, as in training
            frame = frame.assign(**dict.fromkeys(absent, None))
        return frame

    def _check_event_names(self, events: pd.DataFrame, unknown_event_names: str) -> None:
        """`unknown_event_names` "reject": raise on event names the model never saw in training."""
        if unknown_event_names not in ("reject", "keep"):
            raise ValueError(f"unknown_event_names must be 'reject' or 'keep', got {unknown_event_names!r}")
        if "event_name" in events.columns and unknown_event_names == "reject" and self.known_event_names:
            names = {str(n) for n in set(events["event_name"].to_numpy(dtype=object)) if not pd.isna(n)}
            unknown = sorted(names - self.known_event_names)
            if unknown:
                raise InvalidEventsError(
                    f"event_name: {unknown[:5]} never seen in training (known: {sorted(self.known_event_names)[:20]})"
                )

    def score_events(self, events: pd.DataFrame, as_of=None, unknown_event_names: str = "reject") -> pd.DataFrame:
        """Raw canonical events of one or more users -> one row per user: `user_id`, `as_of`,
        `embedding_0..E-1` and `p_<task>` for every seen task. What the registered model serves.

        `as_of` (optional): score every user as of that moment (events at or after it are ignored);
        default: each user just after their own last event (1 second later).
        """
        user = _only_user(events)
        if user is not None and not all(c in events.columns for c in SESSIONIZED_INPUT_COLUMNS):
            return self._score_user(events, user, as_of, unknown_event_names)
        frame = self.as_sessionized(events, unknown_event_names)
        user_ids = frame["user_id"].to_numpy(dtype=object)
        times = frame["event_time"].to_numpy().astype("datetime64[us]")
        one_user = len(user_ids) > 0 and bool((user_ids == user_ids[0]).all())
        users = user_ids[:1] if one_user else np.unique(user_ids)  # sorted
        if _given(as_of):
            cutoff = np.full(len(users), _instant(as_of), dtype="datetime64[us]")
        elif one_user:
            cutoff = np.array([times.max() + np.timedelta64(1, "s")])
        else:
            last = pd.Series(times).groupby(user_ids, sort=True).max()
            cutoff = (last + pd.Timedelta(seconds=1)).to_numpy().astype("datetime64[us]")
        if len(users) == 0:
            vectors = np.zeros((0, self.embedding_dim), dtype=np.float32)
        elif len(users) == 1:  # one user's sessionized events: the encoder's one-user path
            return self._scores(users, cutoff, *self._score_sequence(self.encoder.transform_user(frame, cutoff[0])))
        else:
            vectors = self.embed(frame, pd.DataFrame({"user_id": users, "cutoff": cutoff}))
        return self._scores(users, cutoff, vectors)

    def _score_user(self, events: pd.DataFrame, user: str, as_of, unknown_event_names: str) -> pd.DataFrame:
        """`score_events` of a live request (raw events of one user), without a pandas frame
        between the request and the answer: `sessionize_user`'s arrays go to the encoder.
        Same numbers as the general path (tests/test_serving.py)."""
        self._check_event_names(events, unknown_event_names)
        columns = sessionize_user(events, self.session_gap_seconds, columns=self.encoder.columns)
        for c in self.encoder.columns:  # optional attributes a request leaves out: missing, as in training
            columns.setdefault(c, np.full(len(events), None, dtype=object))
        last = columns["event_time"][-1]  # arrays are in event order
        cutoff = np.array([_instant(as_of) if _given(as_of) else last + np.timedelta64(1, "s")], "datetime64[us]")
        vectors, proba = self._score_sequence(self.encoder.transform_user(columns, cutoff[0]))
        return self._scores(np.array([user], dtype=object), cutoff, vectors, proba)

    def _scores(
        self, users: np.ndarray, cutoff: np.ndarray, vectors: np.ndarray, proba: np.ndarray | None = None
    ) -> pd.DataFrame:
        """`score_events`' answer: users, their cutoffs, embeddings [N, E] and the heads on them
        (`proba` [N, T] when already computed)."""
        proba = self._probabilities(vectors) if proba is None else proba
        names = _answer_columns(self.embedding_dim, tuple(self.probability_columns))
        numbers = np.concatenate([vectors.astype(np.float32, copy=False), proba.astype(np.float32, copy=False)], 1)
        return _answer_frame(names, users.astype(str).astype(object), np.asarray(cutoff, "datetime64[us]"), numbers)

    def evaluate(
        self, events: pd.DataFrame | PreparedEvents, examples: pd.DataFrame, label_columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Long frame (task, metric, value) of AUROC and AUPRC on the given labelled examples."""
        label_columns = list(label_columns or self.task_names)
        proba = self.predict_proba(events, examples)
        rows = []
        for task in label_columns:
            y = examples[task].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
            rows += [
                (task, "auroc", auroc(y, proba[task].to_numpy())),
                (task, "auprc", auprc(y, proba[task].to_numpy())),
            ]
        return pd.DataFrame(rows, columns=["task", "metric", "value"])

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, metadata: dict | None = None, serving_graph: bool = False) -> Path:
        """One artifact file. ``serving_graph``: also export the network's one-user forward
        as ONNX (serving_graph.py; a few seconds, TRACE only) for the served model."""
        metadata = {"session_gap_seconds": float(self.session_gap_seconds), **(metadata or {})}
        graph = _export_serving_graph(self.model) if serving_graph else None
        return save_artifact(path, self.kind, self.model, self.encoder, metadata, serving_graph=graph)

    @classmethod
    def load(cls, path: str | Path) -> UserModel:
        art = load_artifact(path)
        gap = art.metadata.get("session_gap_seconds", DEFAULT_SESSION_GAP_SECONDS)
        return cls(art.kind, art.model, art.encoder, float(gap), serving_graph=art.serving_graph)


@functools.lru_cache(maxsize=64)
def _answer_columns(embedding_dim: int, probability_columns: tuple[str, ...]) -> pd.Index:
    """`score_events`' column names (an Index is immutable: built once per model shape)."""
    return pd.Index(["user_id", "as_of", *(f"embedding_{i}" for i in range(embedding_dim)), *probability_columns])


def _answer_frame(columns: pd.Index, users: np.ndarray, cutoff: np.ndarray, numbers: np.ndarray) -> pd.DataFrame:
    """The frame (`user_id` object, `as_of` datetime64[us], then float32 `numbers` [N, K]) built
    from its three blocks, as pyarrow's `to_pandas` builds frames: a frame from a dict of columns
    makes and then consolidates one array per column (~0.4 ms for a one-row answer of ~40
    columns, more than the network's layers). Falls back to that dict when pandas' block API
    is not there (tests/test_serving.py checks both give the same frame)."""
    n = len(users)
    if _make_block is not None:
        try:
            # datetime64[us] values wrapped as they are (make_block would re-validate them: ~0.03 ms)
            as_of = _DatetimeArray._simple_new(cutoff.reshape(1, n), dtype=cutoff.dtype)
            blocks = (
                _make_block(users.reshape(1, n), placement=slice(0, 1), ndim=2),
                _make_block(as_of, placement=slice(1, 2), ndim=2),
                _make_block(numbers.T, placement=slice(2, len(columns)), ndim=2),
            )
            manager = _BlockManager(blocks, [columns, pd.RangeIndex(n)])
            return pd.DataFrame._from_mgr(manager, axes=manager.axes)
        except (AttributeError, TypeError, ValueError):  # another pandas' internals: the public route
            pass
    return _answer_frame_from_columns(columns, users, cutoff, numbers)


def _answer_frame_from_columns(columns: pd.Index, users: np.ndarray, cutoff: np.ndarray, numbers: np.ndarray):
    """`_answer_frame` through the public constructor (one array per column)."""
    data = {"user_id": users, "as_of": cutoff, **{name: numbers[:, j] for j, name in enumerate(columns[2:])}}
    return pd.DataFrame(data, columns=columns)


def _only_user(events: pd.DataFrame) -> str | None:
    """The user id when every row has the same string `user_id` (a live request), else None."""
    if "user_id" not in events.columns or events.empty:
        return None
    ids = events["user_id"].to_numpy(dtype=object)
    return ids[0] if isinstance(ids[0], str) and bool((ids == ids[0]).all()) else None


def _given(as_of) -> bool:
    """An `as_of` was passed (an empty string, as a client's blank field, is none)."""
    return as_of is not None and not (isinstance(as_of, str) and not as_of.strip())


def _instant(as_of) -> np.datetime64:
    """`as_of` as events' times are read (ISO-8601, epoch seconds, datetime) -> naive UTC."""
    return parse_event_times(pd.Series([as_of])).to_numpy()[0]


#: Columns that mark a frame as already sessionized (`sessionized_events` rows): used as they are.
SESSIONIZED_INPUT_COLUMNS = (
    "user_id",
    "event_time",
    "event_name",
    "session_index",
    "event_index",
    "log_seconds_since_prev_event",
    "log_seconds_since_session_start",
    "hour_of_day",
    "day_of_week",
)

__all__ = ["PROBABILITY_PREFIX", "SESSIONIZED_INPUT_COLUMNS", "UserModel", "labels_tensor", "task_of"]
