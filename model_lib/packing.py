"""Run the per-event layers of a padded batch on its real events only.

A batch holds B sequences padded to L slots (events left-aligned, padding on the right:
encoding.py). In the default run's data a history has ~25 events of L = 128 on average (the
myopic views ~5), so a padded forward pass spends ~80% of its per-event work (embeddings, linear
layers, norms, GELU) and ~93% of its attention work on padding whose results are masked away.
``Packing`` lists where the real events are: per-event layers run on the packed events [N, D],
and attention (or the LSTM) runs on groups of sequences of similar length, each padded only to
the longest of its group (CPU PyTorch has no variable-length attention kernel; one group per
length would cost one kernel call per length).

The result is the padded computation's up to float rounding: padding never reaches a real event
(it is masked out of attention and pooling), so leaving it out changes no output and no gradient.
Dropout's mask is a hash of the seed, the event's padded slot and the feature (slot_dropout.py), so
a seed gives the same masks either way, and only the carried events draw one.
``Packing.of(mask, packed=False)`` is that padded computation itself (every slot carried, one
attention group): the reference the tests compare to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_lib.slot_dropout import slot_dropout

# A new group starts at the first sequence (in order of decreasing length) at most this fraction
# of the group's longest, once the group has MIN_GROUP_ROWS sequences. On the default run's data
# (trace view, batches of 128): ~13 groups, 1.14x as many slots as events and 1.3x the attention
# scores of exact lengths (the padded batch: 5x the slots, 15x the scores). Finer groups measured
# no faster: each attention call has a fixed cost.
GROUP_LENGTH_RATIO = 0.75
MIN_GROUP_ROWS = 4
# The transformer blocks' finer grouping: their training attention (attention_kernel.py) costs
# little per call and rows x length^2 per group, so less padding pays. Measured side by side (one
# thread, batches of 256 of the default run's data): TRACE's training step 1548 -> 1746
# sequences/s at 0.9, the LSTM's 2357 -> 1956 (its fused call has a larger fixed cost): it keeps 0.75.
ATTENTION_GROUP_LENGTH_RATIO = 0.9


@dataclass
class Packing:
    """Where the carried events of a [B, L] batch are, and how attention groups them.

    ``index`` [N]: flat slot (b * L + l) of each carried event, row by row; None = every slot is
    carried (no real padding, or the padded reference). The groups take the rows in the order
    ``rows`` [B] (longest first; None = batch order); group g holds ``sizes[g] = (rows, length)``,
    ``gather`` [sum rows * length] lists the carried event in each of their slots (N = an all-zero
    filler), ``scatter`` [N] where each carried event is in that layout, ``keys[g]`` [rows, length]
    which slots are real events (None: all of them).
    """

    mask: Tensor  # [B, L] real events (an empty row has its first slot made visible: attention_mask)
    index: Tensor | None
    rows: Tensor | None
    sizes: list[tuple[int, int]]
    gather: Tensor | None
    scatter: Tensor | None
    keys: list[Tensor | None]

    @classmethod
    def of(cls, mask: Tensor, packed: bool = True, group_ratio: float = GROUP_LENGTH_RATIO) -> Packing:
        """From a padding mask [B, L] in which every row has at least one True slot; groups as
        ``length_groups(..., group_ratio)``."""
        B, L = mask.shape
        if not packed:  # the padded computation: every slot carried, padding masked as keys
            return cls(mask, None, None, [(B, L)], None, None, [mask])
        if bool(mask.all()):  # nothing to leave out (the full-length case)
            return cls.unpadded(mask)
        # index arithmetic in numpy: a few dozen ops on small arrays, ~10x cheaper than as tensors
        m = mask.cpu().numpy()
        lengths = m.sum(1)  # [B]
        order = np.argsort(-lengths, kind="stable")  # rows, longest first
        sizes = length_groups(lengths[order].tolist(), group_ratio)
        # slot j of a group row holds that row's j-th carried event, or the filler n
        slots = np.repeat([length for _, length in sizes], [rows for rows, _ in sizes])  # [B] per sorted row
        row = np.repeat(order, slots)  # [S] the batch row of every group slot
        j = np.arange(len(row)) - np.repeat(np.cumsum(slots) - slots, slots)  # [S]
        visible = j < lengths[row]  # [S]
        first = np.cumsum(lengths) - lengths  # [B] packed position of each row's first event
        n = int(lengths.sum())
        gather = np.where(visible, first[row] + j, n)  # [S]
        scatter = np.empty(n, dtype=np.int64)
        scatter[gather[visible]] = np.flatnonzero(visible)  # [N]
        groups = np.split(visible, np.cumsum([rows * length for rows, length in sizes])[:-1])

        def tensor(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a).to(mask.device)

        keys = [None if v.all() else tensor(v.reshape(size)) for v, size in zip(groups, sizes)]
        return cls(mask, tensor(np.flatnonzero(m)), tensor(order), sizes, tensor(gather), tensor(scatter), keys)

    @classmethod
    def unpadded(cls, mask: Tensor) -> Packing:
        """Of a mask [B, L] known to be all True: every slot carried, one group, no key mask."""
        return cls(mask, None, None, [tuple(mask.shape)], None, None, [None])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def pack(self, t: Tensor) -> Tensor:
        """Padded [B, L, ...] -> carried events [N, ...]."""
        B, L = self.shape
        flat = t.reshape(B * L, *t.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def to_groups(self, x: Tensor) -> list[Tensor]:
        """Carried events [N, C] -> one [rows, length, C] tensor per attention group."""
        if self.gather is None:
            return [x.view(*self.sizes[0], -1)]
        flat = F.pad(x, (0, 0, 0, 1)).index_select(0, self.gather)  # row N of the padded x: the filler
        parts = flat.split([rows * length for rows, length in self.sizes])
        return [part.view(rows, length, -1) for part, (rows, length) in zip(parts, self.sizes)]

    def from_groups(self, groups: list[Tensor]) -> Tensor:
        """The inverse of ``to_groups``: [rows, length, C] per group -> carried events [N, C]."""
        flats = [g.reshape(-1, g.shape[-1]) for g in groups]
        flat = flats[0] if len(flats) == 1 else torch.cat(flats)
        return flat if self.scatter is None else flat.index_select(0, self.scatter)

    def dropout(self, drop: nn.Dropout, x: Tensor) -> Tensor:
        """``drop``'s rate on carried events [N, D], each event's mask a function of its padded slot
        (slot_dropout.py): the padded computation draws the same masks."""
        if not drop.training or drop.p == 0:
            return x
        return slot_dropout(x, drop.p, self.index)

    def last(self) -> Tensor:
        """Where each sequence's most recent event is among the carried events [B] (events are
        left-aligned: the last real slot of a row)."""
        B, L = self.shape
        lengths = self.mask.sum(1)  # [B]
        if self.index is None:
            return torch.arange(B, device=lengths.device) * L + lengths - 1
        return torch.cumsum(lengths, 0) - 1

    def max_pool(self, x: Tensor) -> Tensor:
        """Global max pooling over each sequence's real events: [N, D] -> [B, D]."""
        pooled = []
        for group, keys in zip(self.to_groups(x), self.keys):  # [rows, length, D]
            if keys is not None:
                group = group.masked_fill(~keys.unsqueeze(-1), float("-inf"))
            # amax: the same values without the argmax (whose gradient `max` routes to one of tied maxima)
            pooled.append(group.max(dim=1).values if torch.is_grad_enabled() else group.amax(dim=1))  # [rows, D]
        pooled = pooled[0] if len(pooled) == 1 else torch.cat(pooled)  # [B, D], rows in the groups' order
        return pooled if self.rows is None else torch.empty_like(pooled).index_copy(0, self.rows, pooled)


def length_groups(lengths: list[int], ratio: float = GROUP_LENGTH_RATIO) -> list[tuple[int, int]]:
    """Split lengths sorted longest first into groups: [(rows, longest)] per group."""
    sizes, start = [], 0
    for i, n in enumerate(lengths):
        if i - start >= MIN_GROUP_ROWS and n <= ratio * lengths[start]:
            sizes.append((i - start, lengths[start]))
            start = i
    sizes.append((len(lengths) - start, lengths[start]))
    return sizes


__all__ = ["ATTENTION_GROUP_LENGTH_RATIO", "GROUP_LENGTH_RATIO", "MIN_GROUP_ROWS", "Packing", "length_groups"]
