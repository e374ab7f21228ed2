"""Single-task baselines on hand-built aggregate features: the TRACE paper's "ST Agg" and "ST Cohort".

The features are computed elsewhere (DuckDB SQL beside the examples, see
``assets/trace_models/aggregate_models.py``), one row per (user, cutoff) example; this module
only learns from the matrix:

    z = (features - mean) / std              # statistics of the training examples   [B, F]
    logits = Linear(z)                        # one logistic regression per task      [B, T]

Row ``t`` of the linear layer is task ``t``'s regression and no weight is shared between tasks,
so the sum of the per-task class-weighted BCE losses trains T independent single-task models
(sharing only the optimiser's schedule and early stopping). The user "embedding" handed to the
unseen-task probes is ``z`` itself: a probe on it is the same aggregate baseline for a task it
was never trained on. ``hidden > 0`` gives a one-hidden-layer network per task instead.

``loss(batch)`` follows the model_lib interface (``training.fit``); the batch holds
``features`` float32 [B, F] and ``labels`` float32 [B, T] (NaN = missing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_lib.trace import class_weights_from_labels, weighted_multitask_bce
from model_lib.training import FitResult, TrainConfig, fit, set_seed

AGGREGATE_KINDS = ("st_agg", "st_cohort")


@dataclass
class AggregateModelConfig:
    kind: str = "st_agg"  # which feature set: see AGGREGATE_KINDS
    feature_names: tuple[str, ...] = field(default_factory=tuple)
    task_names: tuple[str, ...] = field(default_factory=tuple)
    hidden: int = 0  # 0: logistic regression per task
    class_weighting: str = "balanced"

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)


class AggregateModel(nn.Module):
    def __init__(self, config: AggregateModelConfig):
        super().__init__()
        if config.kind not in AGGREGATE_KINDS:
            raise ValueError(f"unknown aggregate kind {config.kind!r}; known: {AGGREGATE_KINDS}")
        self.config = c = config
        self.register_buffer("mean", torch.zeros(c.n_features))
        self.register_buffer("std", torch.ones(c.n_features))
        self.register_buffer("class_weights", torch.ones(c.n_tasks, 2))
        if c.hidden > 0:  # per-task hidden layers: grouped as a block-diagonal first layer
            self.hidden = nn.Conv1d(c.n_features * c.n_tasks, c.hidden * c.n_tasks, 1, groups=c.n_tasks)
            self.out = nn.Conv1d(c.hidden * c.n_tasks, c.n_tasks, 1, groups=c.n_tasks)
        else:
            self.linear = nn.Linear(c.n_features, c.n_tasks)

    def set_statistics(self, features: Tensor, labels: Tensor) -> None:
        """Standardisation and class weights from the training rows only."""
        f = torch.nan_to_num(features.double())
        self.mean.copy_(f.mean(0).float())
        std = f.std(0).float()
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.class_weights.copy_(class_weights_from_labels(labels, self.config.class_weighting))

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Standardised features [B, F]: what the unseen-task probes see."""
        return (torch.nan_to_num(batch["features"].float()) - self.mean) / self.std

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        z = self.embed(batch)  # [B, F]
        if self.config.hidden > 0:
            x = z.repeat(1, self.config.n_tasks).unsqueeze(-1)  # [B, T*F, 1]
            return self.out(F.gelu(self.hidden(x))).squeeze(-1)  # [B, T]
        return self.linear(z)  # [B, T]

    def predict_proba(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.sigmoid(self.forward(batch))

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return weighted_multitask_bce(self.forward(batch), batch["labels"].float(), self.class_weights)

    # ---------------------------------------------------------------- persistence (weights_only)
    def artifact(self, metadata: dict | None = None) -> dict:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        return {"kind": self.config.kind, "config": config, "state_dict": self.state_dict(), "metadata": metadata or {}}

    @classmethod
    def from_artifact(cls, state: dict) -> AggregateModel:
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()}
        model = cls(AggregateModelConfig(**cfg))
        model.load_state_dict(state["state_dict"])
        return model.eval()


def train_aggregate_model(
    kind: str,
    feature_names,
    task_names,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    valid_features: np.ndarray,
    valid_labels: np.ndarray,
    train_config: TrainConfig | None = None,
    hidden: int = 0,
    on_epoch=None,
) -> tuple[AggregateModel, FitResult]:
    """Fit one aggregate baseline with the shared loop (early stopping on the validation loss)."""
    train_config = train_config or TrainConfig()
    train = {"features": torch.as_tensor(train_features, dtype=torch.float32), "labels": _labels(train_labels)}
    valid = {"features": torch.as_tensor(valid_features, dtype=torch.float32), "labels": _labels(valid_labels)}
    set_seed(train_config.seed)
    model = AggregateModel(AggregateModelConfig(kind, tuple(feature_names), tuple(task_names), hidden))
    model.set_statistics(train["features"], train["labels"])
    result = fit(model, train, valid, train_config, on_epoch=on_epoch)
    return model, result


@torch.inference_mode()
def predict(model: AggregateModel, features: np.ndarray, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, T], embeddings [N, F]) in batches."""
    model.eval()
    probs, embs = [], []
    x = torch.as_tensor(features, dtype=torch.float32)
    for lo in range(0, len(x), batch_size):
        batch = {"features": x[lo : lo + batch_size]}
        probs.append(model.predict_proba(batch))
        embs.append(model.embed(batch))
    if not probs:
        return np.zeros((0, model.config.n_tasks), np.float32), np.zeros((0, model.config.n_features), np.float32)
    return torch.cat(probs).numpy(), torch.cat(embs).numpy()


def _labels(values: np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


__all__ = [
    "AGGREGATE_KINDS",
    "AggregateModel",
    "AggregateModelConfig",
    "predict",
    "train_aggregate_model",
]
