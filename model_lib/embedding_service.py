"""The deployable unit of the TRACE family: encoder + network, trained, saved, served as one.

``UserModel`` is what the workflow trains (``UserModel.train``), logs (``save`` -> one artifact
file, see artifact.py), evaluates (``evaluate``) and serves: ``embed`` / ``predict_proba`` for
batches of (user_id, cutoff) examples, and ``embed_user`` for one user's events in real time.
Inference runs under ``torch.inference_mode`` in eval mode; it is deterministic, and padding
never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from model_lib.artifact import load_artifact, save_artifact
from model_lib.encoding import EncoderConfig, PreparedEvents, SequenceEncoder, prepare_events
from model_lib.metrics import auprc, auroc
from model_lib.trace import SequenceUserModel
from model_lib.trace_baselines import build_model, encoder_config_for, make_config
from model_lib.training import EpochReport, FitResult, TrainConfig, fit, iterate_batches, set_seed


def labels_tensor(examples: pd.DataFrame, label_columns: Sequence[str]) -> Tensor:
    """Label columns (bool/0-1, nullable) -> float32 [N, T] with NaN for missing."""
    missing = [c for c in label_columns if c not in examples.columns]
    if missing:
        raise ValueError(f"examples lack the label columns {missing}")
    values = examples[list(label_columns)].astype("Float64").to_numpy(dtype=np.float32, na_value=np.nan)
    return torch.from_numpy(values)


@dataclass
class UserModel:
    kind: str  # "trace", "myopic", "vanilla_transformer" or "lstm"
    model: SequenceUserModel
    encoder: SequenceEncoder

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

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def _run(
        self, batch_tensors: dict[str, Tensor], fn: Callable[[dict[str, Tensor]], Tensor], batch_size: int
    ) -> np.ndarray:
        self.model.eval()
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

    def predict_proba(
        self, events: pd.DataFrame | PreparedEvents, examples: pd.DataFrame, batch_size: int = 2048
    ) -> pd.DataFrame:
        """Probability per task, one column per task name, index aligned with ``examples``."""
        return self.proba_from_embeddings(self.embed(events, examples, batch_size), index=examples.index)

    @torch.inference_mode()
    def proba_from_embeddings(self, embeddings: np.ndarray, index: pd.Index | None = None) -> pd.DataFrame:
        """Task probabilities of users already embedded: the heads on the embedding (forward = heads(embed)).

        Callers that need both embeddings and probabilities encode once and call this.
        """
        self.model.eval()
        logits = self.model.heads(
            torch.as_tensor(np.asarray(embeddings, dtype=np.float32).reshape(-1, self.embedding_dim))
        )
        return pd.DataFrame(torch.sigmoid(logits).numpy(), columns=list(self.task_names), index=index)

    def embed_user(self, user_events: pd.DataFrame, as_of=None) -> np.ndarray:
        """Embedding [E] of one user from their sessionized events (real-time serving).

        ``as_of``: the moment of the request (events at or after it are ignored); default now,
        which is what a live request means. Pass it explicitly for reproducible results.
        """
        if "user_id" in user_events.columns and user_events["user_id"].nunique() > 1:
            raise ValueError("embed_user takes the events of exactly one user")
        cutoff = pd.Timestamp.now(tz="UTC") if as_of is None else pd.Timestamp(as_of)
        with torch.inference_mode():
            self.model.eval()
            return self.model.embed(self.encoder.transform_user(user_events, cutoff))[0].numpy()

    def embed_latest(self, events: pd.DataFrame, batch_size: int = 2048, as_of=None) -> pd.DataFrame:
        """Every user's embedding as of one moment: the serving entry point.

        This is what the registered MLflow model's ``predict`` calls: a frame of sessionized
        events of any number of users in, one row per user out (``user_id``, ``embedding_0..``).
        All users share one cutoff, ``as_of`` (default: 1 s after the latest event of the frame),
        as all users of a training example set share a cutoff: recency is then the time from each
        user's events to that moment, the quantity training saw. (A per-user cutoff 1 s after each
        user's own last event, as before, gave every user a recency of 1 s, a value training never
        had: training cutoffs are fixed moments that users reach at any distance from their last
        event.)
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
    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        return save_artifact(path, self.kind, self.model, self.encoder, metadata)

    @classmethod
    def load(cls, path: str | Path) -> UserModel:
        art = load_artifact(path)
        return cls(art.kind, art.model, art.encoder)


__all__ = ["UserModel", "labels_tensor"]
