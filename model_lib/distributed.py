"""Data-parallel training past one process: PyTorch DistributedDataParallel, launched the torchrun way.

``fit_distributed`` starts ``world_size`` worker processes with torch's elastic launcher (what
``torchrun --standalone --nproc-per-node N`` calls: c10d rendezvous on a free local port), each
of which joins a process group (gloo on CPU, NCCL on GPU), wraps the model in
``DistributedDataParallel`` and runs the one training loop (``training.fit``) on its own share of
the training shards. Gradients are averaged across workers after every backward, so every worker
holds the same weights; each evaluates the whole validation set, so early stopping decides the same
everywhere. Rank 0's weights and history are returned to the caller.

Why a launcher and not threads: the workers are separate processes (one per core or GPU), the
same code runs on one machine or, with a multi-node rendezvous, on several.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from model_lib.sequence_shards import ShardedExamples
from model_lib.training import FitResult, TrainConfig, fit


class _DDPLoss(nn.Module):
    """Routes ``loss(batch)`` through the DDP wrapper's forward, which is what arms the gradient
    all-reduce of the following backward."""

    class _Forward(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, batch: dict[str, Tensor]) -> Tensor:
            return self.model.loss(batch)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.ddp = DistributedDataParallel(self._Forward(model))

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.ddp(batch) if self.training else self.ddp.module(batch)


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _worker(
    build: Callable[..., nn.Module],
    build_args: tuple,
    initial_state: dict[str, Tensor],
    train_root: str,
    valid_root: str,
    keys: tuple[str, ...],
    config: TrainConfig,
) -> tuple[dict[str, Tensor], FitResult] | None:
    """One rank: the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) is set by the launcher."""
    dist.init_process_group(backend())
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model = build(*build_args)
        model.load_state_dict(initial_state)
        train = ShardedExamples(train_root, keys=keys).partition(rank, world)
        valid = ShardedExamples(valid_root, keys=keys)
        per_rank = replace(
            config, sample_budget=None if config.sample_budget is None else -(-config.sample_budget // world)
        )
        wrapped = _DDPLoss(model)
        result = fit(wrapped, train, valid, per_rank)
        return (model.state_dict(), result) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def fit_distributed(
    model: nn.Module,
    build: Callable[..., nn.Module],
    build_args: tuple,
    train: ShardedExamples,
    valid: ShardedExamples,
    config: TrainConfig,
    world_size: int = 2,
) -> FitResult:
    """Train ``model`` with DDP on ``world_size`` processes; afterwards ``model`` holds rank 0's
    best weights (in eval mode), as after ``training.fit``.

    ``build(*build_args)`` must rebuild the same architecture in a fresh process (a module-level
    function and picklable arguments, e.g. ``trace_baselines.build_model`` and ``(kind, config)``);
    ``model``'s current weights (class-weight buffers included) are the common starting point.
    With ``world_size == 1`` this is ``training.fit`` in this process.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size == 1:
        return fit(model, train, valid, config)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=f"trace-dagster-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free local port
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    threads = config.num_threads or max(1, (os.cpu_count() or 1) // world_size)
    per_worker = replace(config, num_threads=threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = train.keys or tuple(p.stem for p in sorted(train.shards[0].glob("*.npy")))
    results = elastic_launch(launch, _worker)(
        build, build_args, state, str(train.root), str(valid.root), keys, per_worker
    )
    weights, result = results[0]
    model.load_state_dict(weights)
    model.eval()
    return result


__all__ = ["backend", "fit_distributed"]
