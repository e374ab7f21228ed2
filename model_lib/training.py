"""One training loop for every model in model_lib (TRACE, its baselines, MTLDS and its baselines).

A model only has to implement ``loss(batch: dict[str, Tensor]) -> Tensor`` (a scalar). Data are
``dict[str, Tensor]`` whose tensors share the first dimension, or the same on disk as shards
(``sequence_shards.ShardedExamples``, read batch by batch), so the loop never needs to know
what a model's inputs mean. Why one loop: every comparison between models (uplift over a
baseline) is only fair if they are trained by the same optimiser, batching, early stopping and
seeding code.

Reproducibility: ``fit`` seeds python/numpy/torch from ``config.seed`` and draws the batch order
from its own ``torch.Generator``; with ``num_threads`` set, two fits on the same data give
bit-identical weights on CPU. A checkpoint stores the model, optimiser, both RNG states,
the history and the best weights, so an interrupted fit resumed from it ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model_lib.sequence_shards import ShardedExamples


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 3  # epochs without validation improvement before stopping
    min_delta: float = 0.0  # an improvement must lower the validation loss by more than this
    seed: int = 0
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    num_threads: int | None = None  # torch.set_num_threads for reproducible CPU runs
    # Upper bound on training rows seen over the whole fit (all epochs); None = epochs alone.
    # It makes a step's cost independent of the data size: at scale the budget, not the
    # epoch count, ends training (the last epoch may then be partial).
    sample_budget: int | None = None


@dataclass
class EpochReport:
    epoch: int  # 1-based
    train_loss: float  # mean over training samples (batch losses weighted by batch size)
    valid_loss: float  # mean over validation samples, eval mode
    seconds: float  # wall time of the training pass of this epoch
    samples_per_second: float  # training throughput of this epoch
    is_best: bool  # lowest validation loss so far (by more than min_delta)
    samples: int = 0  # training rows of this epoch (counts against TrainConfig.sample_budget)


@dataclass
class FitResult:
    history: list[EpochReport] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_loss: float = math.inf
    stopped_early: bool = False


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU) so that initialisation and dropout are repeatable."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 (code we do not own may use the global RNG)
    torch.manual_seed(seed)


def _num_rows(data: dict[str, Tensor] | ShardedExamples) -> int:
    if isinstance(data, ShardedExamples):
        return len(data)
    if not data:
        raise ValueError("data is an empty dict: expected at least one tensor")
    sizes = {name: int(t.shape[0]) for name, t in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"tensors must share their first dimension, got {sizes}")
    return next(iter(sizes.values()))


def iterate_batches(
    data: dict[str, Tensor] | ShardedExamples,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Yield dicts of row slices of ``data``; the last batch may be smaller.

    Shuffling draws one permutation per call from ``generator`` (so the batch order is a
    function of the generator's state only, not of the global RNG). Sharded data on disk
    (``ShardedExamples``) is read batch by batch, never whole.
    """
    if isinstance(data, ShardedExamples):
        yield from data.batches(batch_size, shuffle=shuffle, generator=generator)
        return
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = _num_rows(data)
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            yield {name: t[start : start + batch_size] for name, t in data.items()}
        else:
            idx = order[start : start + batch_size]
            yield {name: t[idx] for name, t in data.items()}


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: dict[str, Tensor] | ShardedExamples, batch_size: int) -> float:
    """Mean loss over all rows of ``data`` in eval mode (batch losses weighted by batch size)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in iterate_batches(data, batch_size):
        rows = _num_rows(batch)
        total += float(model.loss(batch)) * rows
        count += rows
    model.train(was_training)
    return total / max(count, 1)


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (tmp file + rename) so that a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fit(
    model: nn.Module,
    train: dict[str, Tensor] | ShardedExamples,
    valid: dict[str, Tensor] | ShardedExamples,
    config: TrainConfig,
    on_epoch: Callable[[EpochReport], None] | None = None,
    checkpoint_path: str | Path | None = None,
) -> FitResult:
    """Train ``model`` with AdamW and early stopping on the validation loss.

    After return the model holds the weights of the best validation epoch (in eval mode).
    With ``checkpoint_path``, the full training state is saved after every epoch and, if the
    file already exists, training resumes from it (a finished run returns at once).
    """
    n_train = _num_rows(train)
    if _num_rows(valid) == 0 or n_train == 0:
        raise ValueError("fit needs at least one training row and one validation row")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)

    # fused: one kernel over all parameters instead of ~10 ops per tensor (same update, up to rounding)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
    )
    generator = torch.Generator().manual_seed(config.seed)
    result = FitResult()
    best_state = _clone_state(model)
    epochs_without_improvement = 0
    start_epoch = 1

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator_state"])
        torch.set_rng_state(state["torch_rng_state"])
        best_state = state["best_model"]
        result = FitResult(
            history=[EpochReport(**h) for h in state["history"]],
            best_epoch=int(state["best_epoch"]),
            best_valid_loss=float(state["best_valid_loss"]),
            stopped_early=bool(state["stopped_early"]),
        )
        epochs_without_improvement = int(state["epochs_without_improvement"])
        start_epoch = int(state["epoch"]) + 1

    params = [p for p in model.parameters() if p.requires_grad]
    if config.sample_budget is not None and config.sample_budget <= 0:
        raise ValueError(f"sample_budget must be positive or None, got {config.sample_budget}")
    seen_before = sum(h.samples for h in result.history)
    for epoch in range(start_epoch, config.epochs + 1):
        budget_left = None if config.sample_budget is None else config.sample_budget - seen_before
        if result.stopped_early or (budget_left is not None and budget_left <= 0):
            break
        model.train()
        started = time.perf_counter()
        total, count = 0.0, 0
        for step, batch in enumerate(iterate_batches(train, config.batch_size, shuffle=True, generator=generator)):
            if budget_left is not None and count >= budget_left:
                break
            loss = model.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss {float(loss.detach())} at epoch {epoch}, step {step}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            rows = _num_rows(batch)
            total += float(loss.detach()) * rows
            count += rows
        seconds = time.perf_counter() - started
        seen_before += count
        valid_loss = evaluate_loss(model, valid, config.batch_size)

        is_best = valid_loss < result.best_valid_loss - config.min_delta
        if is_best:
            result.best_epoch, result.best_valid_loss = epoch, valid_loss
            best_state = _clone_state(model)
            epochs_without_improvement = 0
        else:
            epochs_without_improvement += 1
        report = EpochReport(
            epoch=epoch,
            train_loss=total / count,
            valid_loss=valid_loss,
            seconds=seconds,
            samples_per_second=count / max(seconds, 1e-9),
            is_best=is_best,
            samples=count,
        )
        result.history.append(report)
        result.stopped_early = epochs_without_improvement >= config.patience and epoch < config.epochs

        if ckpt is not None:
            _save_checkpoint(
                ckpt,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator_state": generator.get_state(),
                    "torch_rng_state": torch.get_rng_state(),
                    "best_model": best_state,
                    "history": [asdict(h) for h in result.history],
                    "best_epoch": result.best_epoch,
                    "best_valid_loss": result.best_valid_loss,
                    "stopped_early": result.stopped_early,
                    "epochs_without_improvement": epochs_without_improvement,
                    "epoch": epoch,
                    "train_config": asdict(config),
                },
            )
        if on_epoch is not None:
            on_epoch(report)

    model.load_state_dict(best_state)
    model.eval()
    return result


__all__ = [
    "EpochReport",
    "FitResult",
    "TrainConfig",
    "evaluate_loss",
    "fit",
    "iterate_batches",
    "set_seed",
]
