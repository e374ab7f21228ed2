"""Encoded examples on disk: shards of memory-mapped numpy arrays, read batch by batch.

Why: the encoded tensors of 100k sequence examples take ~0.8 GB; at 10^7 events they no longer
fit beside everything else. The workflow encodes one user-hash bucket at a time and appends it as
a shard (``ShardWriter``); training and inference read them back through ``ShardedExamples``,
which memory-maps each array (``np.load(mmap_mode="r")``) and copies only the rows of the batch
being used. Resident memory is bounded by the batch size (plus the OS page cache, which the
kernel reclaims), not by the number of examples.

Layout: ``<root>/<shard:05d>/<key>.npy``, one file per tensor key, every key with the same first
dimension; ``<root>/<shard>/rows`` marks a complete shard (written last, so a crash mid-shard
never leaves a half shard that a reader would take as whole).

``ShardedExamples.batches`` is what ``training.fit`` iterates; ``ShardedIterableDataset`` is the
same stream as a torch ``IterableDataset``, split across ``DataLoader`` workers and across
DistributedDataParallel ranks by shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

DONE_MARKER = "rows"


class ShardWriter:
    """Appends shards (dicts of arrays with a common first dimension) under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.n_shards = len(list(self.root.glob(f"*/{DONE_MARKER}")))

    def write(self, arrays: dict[str, np.ndarray | Tensor]) -> Path | None:
        """One shard; empty inputs (0 rows) write nothing and return None."""
        arrays = {k: v.numpy() if isinstance(v, Tensor) else np.asarray(v) for k, v in arrays.items()}
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays of a shard must share their first dimension, got {sizes}")
        rows = next(iter(sizes.values()))
        if rows == 0:
            return None
        shard = self.root / f"{self.n_shards:05d}"
        shard.mkdir()
        for key, value in arrays.items():
            if value.dtype == object:
                raise TypeError(f"shard array {key!r} has dtype object: store numbers or fixed-width strings")
            np.save(shard / f"{key}.npy", value, allow_pickle=False)
        (shard / DONE_MARKER).write_text(str(rows))
        self.n_shards += 1
        return shard


def _as_batch_value(values: np.ndarray) -> Tensor | np.ndarray:
    """Numbers as tensors; fixed-width strings (ids) stay numpy arrays (torch has no string dtype)."""
    return values if values.dtype.kind in "US" else torch.from_numpy(values)


class ShardedExamples:
    """Read side: every complete shard under ``root``, as batches of torch tensors.

    ``keys`` limits what is read (e.g. the model inputs and labels, not the ids).
    """

    def __init__(self, root: str | Path, keys: tuple[str, ...] | None = None):
        self.root = Path(root)
        self.shards = sorted(p.parent for p in self.root.glob(f"*/{DONE_MARKER}"))
        self.shard_rows = [int((s / DONE_MARKER).read_text()) for s in self.shards]
        self.keys = keys
        self.rank, self.world_size = 0, 1

    def partition(self, rank: int, world_size: int) -> ShardedExamples:
        """This rank's share for data-parallel training: rows ``rank, rank + world_size, ...`` of
        every shard, the same number on every rank (the last ``n % world_size`` rows of a shard are
        left out), so that every rank runs the same number of steps, as DDP requires."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        part = ShardedExamples(self.root, self.keys)
        part.rank, part.world_size = rank, world_size
        return part

    def _rows_of(self, i: int) -> np.ndarray | None:
        """Row indexes of shard ``i`` in this partition (None: all of them)."""
        if self.world_size == 1:
            return None
        n = self.shard_rows[i] // self.world_size * self.world_size
        return np.arange(self.rank, n, self.world_size)

    def __len__(self) -> int:
        return sum(self.shard_rows) if self.world_size == 1 else sum(n // self.world_size for n in self.shard_rows)

    def _arrays(self, shard: Path) -> dict[str, np.ndarray]:
        files = sorted(shard.glob("*.npy"))
        return {
            f.stem: np.load(f, mmap_mode="r", allow_pickle=False)
            for f in files
            if self.keys is None or f.stem in self.keys
        }

    def column(self, key: str) -> np.ndarray:
        """One key over every shard, in shard order (for small columns: labels, ids)."""
        parts = [np.asarray(np.load(s / f"{key}.npy", mmap_mode="r")) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        shard_ids: list[int] | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Batches of at most ``batch_size`` rows; each batch comes from one shard.

        Shuffling permutes the shard order and the rows within each shard (from ``generator``
        only); a batch's rows are gathered from the memory maps in sorted order (sequential reads).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ids = list(range(len(self.shards))) if shard_ids is None else list(shard_ids)
        if shuffle:
            ids = [ids[i] for i in torch.randperm(len(ids), generator=generator).tolist()]
        for i in ids:
            arrays = self._arrays(self.shards[i])
            mine = self._rows_of(i)
            n = self.shard_rows[i] if mine is None else len(mine)
            order = torch.randperm(n, generator=generator).numpy() if shuffle else None
            for start in range(0, n, batch_size):
                if order is None:
                    rows = slice(start, start + batch_size) if mine is None else mine[start : start + batch_size]
                else:
                    rows = np.sort(order[start : start + batch_size])
                    rows = rows if mine is None else mine[rows]
                yield {k: _as_batch_value(np.array(a[rows])) for k, a in arrays.items()}  # copies the batch only


class ShardedIterableDataset(IterableDataset):
    """``ShardedExamples`` as a torch ``IterableDataset`` of whole batches (use
    ``DataLoader(dataset, batch_size=None)``).

    Shards are dealt round-robin to (rank, worker) pairs, so DistributedDataParallel ranks and
    DataLoader workers read disjoint shards; call ``set_epoch`` to reshuffle each epoch.
    """

    def __init__(
        self,
        examples: ShardedExamples,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.examples, self.batch_size, self.shuffle, self.seed = examples, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.examples.shards)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=generator).tolist()
        mine = order[slot::slots]
        yield from self.examples.batches(self.batch_size, shuffle=self.shuffle, generator=generator, shard_ids=mine)


__all__ = ["ShardWriter", "ShardedExamples", "ShardedIterableDataset"]
