"""TRACE: Transformer-based user Representations from Attributed Clickstream Event sequences.

Black et al., 2024 (arXiv 2409.12972); see ../shared/design/papers.md. The model, per event
(shapes with B = batch, L = max_len, C = categorical columns, F = time features, D = d_model):

    x = sum_c Emb_c(cat_ids[..., c])            # page name + attributes      [B, L, D]
      + Linear(time_features)                   # engineered time features    [B, L, D]
      + EventPosEmb(event_pos) + SessionPosEmb(session_pos)   # learned, independent
    x = Block^n_layers(x, padding mask)         # 1 block, 8 heads, width 32, ff 128
    h = max over real events of x               # global max pooling          [B, D]
    u = GELU(Linear(h))                         # shared dense layer: the user embedding [B, E]
    logits = Linear(u)                          # one linear head per task    [B, T]

and the loss is the sum over tasks of class-weighted binary cross-entropy.

Choices the paper leaves to us (papers.md): pre-LayerNorm blocks (stable without warm-up);
GELU on the shared layer; the T task heads are one ``Linear(E, T)``, which is exactly T
independent linear heads side by side; positions count back from the cutoff (encoding.py).
Class weights: the secondary summary gives w_k = 1 / positive rate for positives; we use the
*balanced* form w_pos = 1 / (2 p), w_neg = 1 / (2 (1 - p)) by default, which gives positives
the same relative weight against negatives as 1/p does up to the (1-p) factor, but keeps every
task's loss on the same scale (mean weight 1) so that no task dominates the sum;
``class_weighting="inverse_positive_rate"`` gives the summary's form.

Ablation switches (config fields; the defaults are the paper's model): ``use_event_positions``,
``use_session_positions`` (off = that embedding is left out, so the output is invariant to a
permutation of those positions), ``position_encoding`` ("sinusoidal" = fixed sin/cos tables in
place of the learned ones), ``n_layers`` and ``class_weighting``. The session gap is a
sessionization parameter (``sessionized_events``), not a model field. Missing labels (NaN)
are masked out of the loss.

The sequence -> pooled-vector part is ``SequenceUserModel.pool``; the baselines
(trace_baselines.py) override only that, and share the embedding, heads, loss and inference.
Every layer after the input runs on the real events only, not on the padding (packing.py): the
same results as on the padded batch up to float rounding, at a fraction of the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_lib import attention_kernel
from model_lib.packing import ATTENTION_GROUP_LENGTH_RATIO, Packing

CLASS_WEIGHTINGS = ("balanced", "inverse_positive_rate", "none")
POSITION_ENCODINGS = ("learned", "sinusoidal")


@dataclass
class TRACEConfig:
    vocab_sizes: tuple[int, ...] = (16,)  # one embedding table per categorical column (encoder)
    n_time_features: int = 7
    n_tasks: int = 5
    max_len: int = 128  # event positions 0 .. max_len-1
    max_sessions: int = 32  # session positions 0 .. max_sessions-1
    d_model: int = 32
    n_heads: int = 8
    d_ff: int = 128
    n_layers: int = 1
    dropout: float = 0.1
    embedding_dim: int = 32  # size of the user embedding (shared dense layer)
    use_event_positions: bool = True  # ablation switches: the paper's open question
    use_session_positions: bool = True
    position_encoding: str = "learned"  # "learned" (the paper) or "sinusoidal" (fixed tables)
    class_weighting: str = "balanced"
    task_names: tuple[str, ...] = field(default_factory=tuple)


def class_weights_from_labels(labels: Tensor, scheme: str = "balanced") -> Tensor:
    """[N, T] labels in {0, 1, NaN} -> [T, 2] weights (negative, positive) per task."""
    if scheme not in CLASS_WEIGHTINGS:
        raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {scheme!r}")
    labels = labels.double()
    observed = ~torch.isnan(labels)
    n = observed.sum(0).clamp(min=1)
    p = (torch.nan_to_num(labels, nan=0.0).sum(0) / n).clamp(1e-4, 1 - 1e-4)  # [T]
    if scheme == "balanced":
        w = torch.stack([0.5 / (1 - p), 0.5 / p], dim=1)
    elif scheme == "inverse_positive_rate":
        w = torch.stack([torch.ones_like(p), 1.0 / p], dim=1)
    else:
        w = torch.ones(len(p), 2, dtype=torch.float64)
    return w.float()


def weighted_multitask_bce(logits: Tensor, labels: Tensor, class_weights: Tensor) -> Tensor:
    """Sum over tasks of the class-weighted mean BCE over the rows whose label is not NaN.

    logits, labels: [B, T]; class_weights: [T, 2] (negative, positive).
    """
    observed = ~torch.isnan(labels)  # [B, T]
    y = torch.nan_to_num(labels, nan=0.0)
    w = torch.where(y > 0.5, class_weights[:, 1], class_weights[:, 0]) * observed  # [B, T]
    per_elem = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # [B, T]
    per_task = (w * per_elem).sum(0) / observed.sum(0).clamp(min=1)  # [T]
    return per_task.sum()


def attention_mask(mask: Tensor) -> Tensor:
    """Padding mask [B, L] with an all-padding row (a user with no history) given one visible
    slot, so attention never softmaxes over nothing; that slot holds PAD ids and zeros."""
    if bool(mask.all()):  # nothing to reveal (a served user's trimmed sequence, full-length histories)
        return mask
    empty = ~mask.any(dim=1, keepdim=True)  # [B, 1]
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return mask | (empty & first)


def masked_max_pool(x: Tensor, mask: Tensor) -> Tensor:
    """Global max pooling over real positions: x [B, L, D], mask [B, L] -> [B, D]."""
    return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values


class SelfAttention(nn.Module):
    """Multi-head self-attention over real events. No dropout on the attention weights: on CPU
    it cost as much as the attention itself (measured: 104 vs 38 ms fwd+bwd at B=128, L=64),
    and the block keeps dropout on its residual branches. Runs on packed events (packing.py):
    one attention call per group of sequences of similar length. Training (where autograd needs
    the gradients) runs it on ``attention_kernel`` when it applies (heads of width 4, the model's
    default), inference on PyTorch's kernel: the same results up to float rounding."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:  # x [N, D]: packed events
        groups = packing.to_groups(self.qkv(x))  # qkv [B, L, 3D] per group
        return self.proj(packing.from_groups([self.attend(qkv, keys) for qkv, keys in zip(groups, packing.keys)]))

    def attend(self, qkv: Tensor, keys: Tensor | None) -> Tensor:
        """Projections [B, L, 3D] of a group of sequences -> attention outputs [B, L, D]; ``keys``
        [B, L]: the real events (None: every slot is one, no mask at all)."""
        B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        if qkv.requires_grad and attention_kernel.applies(qkv, self.n_heads):  # training: same math, 2-3x faster
            return attention_kernel.attend(qkv, keys, self.n_heads)
        # [3, B, H, L, Dh] as views (two calls: each tensor op costs a served request ~0.01-0.04 ms)
        q, k, v = qkv.view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        # every query may attend to every real event of its sequence
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if keys is None else keys[:, None, None, :])
        return y.transpose(1, 2).reshape(B, L, D)


class Block(nn.Module):
    """Pre-LayerNorm transformer encoder block (bidirectional: a user's past has no future)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:  # x [N, D]: packed events
        x = x + packing.dropout(self.drop, self.attn(self.ln1(x), packing))
        return x + packing.dropout(self.drop, self.ff(self.ln2(x)))

    def infer_unpadded(self, x: Tensor, B: int, L: int) -> Tensor:
        """``forward`` in eval mode on B sequences of L real events each (x [B * L, D]): no
        dropout, no packing to build or undo, attention without a mask."""
        x = x + self.attn.proj(self.attn.attend(self.attn.qkv(self.ln1(x)).view(B, L, -1), None).view(B * L, -1))
        return x + self.ff(self.ln2(x))


class FixedPositions(nn.Module):
    """Sinusoidal position table used like an ``nn.Embedding``: ids [...] -> [..., D]. Not in the
    state dict (it is a function of its shape), so it adds no parameter."""

    def __init__(self, n_positions: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_positions, dim), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table[ids.long()]


class EventEmbedding(nn.Module):
    """Per-event input vector: attribute embeddings + time projection (+ event/session positions).

    ``max_len`` / ``max_sessions`` = 0 leaves that position out (the ablation "positions off");
    ``position_encoding="sinusoidal"`` swaps both learned tables for fixed sin/cos ones.
    """

    def __init__(
        self,
        vocab_sizes,
        n_time_features,
        d_model,
        max_len=0,
        max_sessions=0,
        padding_idx=0,
        position_encoding: str = "learned",
    ):
        super().__init__()
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {POSITION_ENCODINGS}, got {position_encoding!r}")
        positions = nn.Embedding if position_encoding == "learned" else FixedPositions
        self.categorical = nn.ModuleList(nn.Embedding(v, d_model, padding_idx=padding_idx) for v in vocab_sizes)
        self.time = nn.Linear(n_time_features, d_model) if n_time_features else None
        self.event_pos = positions(max_len, d_model) if max_len else None
        self.session_pos = positions(max_sessions, d_model) if max_sessions else None
        # (stacked table, table sizes, row offsets) while frozen for serving (`freeze`), else None
        self._frozen: tuple[Tensor, np.ndarray, np.ndarray] | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.unfreeze())

    def forward(self, batch: dict[str, Tensor], packing: Packing) -> Tensor:
        """Vectors [N, D] of the events ``packing`` carries (padded inputs [B, L, ...])."""
        if not torch.is_grad_enabled() and len(self.categorical):
            return self._lookup_fused(batch, packing)
        ids = packing.pack(batch["cat_ids"])  # [N, C]
        x = sum(emb(ids[:, c]) for c, emb in enumerate(self.categorical))  # [N, D]
        if self.time is not None:
            x = x + self.time(packing.pack(batch["time_features"]))
        if self.event_pos is not None:
            x = x + self.event_pos(packing.pack(batch["event_pos"]))
        if self.session_pos is not None:
            x = x + self.session_pos(packing.pack(batch["session_pos"]))
        return x

    def freeze(self) -> None:
        """Stack the lookup tables once, for serving: a served request then skips the copy of
        every table that `_lookup_fused` otherwise makes per call (most of its cost: the tables
        hold the whole vocabulary). The weights stop requiring gradients, and `train()`, `unfreeze`
        and a loaded state dict drop the stacked copy, so it cannot go stale behind an optimiser
        (see `_lookup_fused`)."""
        self.eval()
        self.requires_grad_(False)
        with torch.no_grad():
            self._frozen = self._stacked_table()

    def unfreeze(self) -> None:
        self._frozen = None

    def train(self, mode: bool = True):
        if mode:
            self.unfreeze()
        return super().train(mode)

    def _tables(self) -> list[tuple[str, Tensor]]:
        """(input key, table) of every lookup, in the order ``forward`` adds them."""
        tables = [("cat_ids", emb.weight) for emb in self.categorical]
        for key, positions in (("event_pos", self.event_pos), ("session_pos", self.session_pos)):
            if positions is not None:
                tables.append((key, positions.weight if isinstance(positions, nn.Embedding) else positions.table))
        return tables

    def _stacked_table(self) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """(every table stacked end to end [sum of sizes, D], table sizes, row offsets), the time
        projection's bias folded into the first table."""
        tables = self._tables()
        sizes = np.array([t.shape[0] for _, t in tables])
        table = torch.cat([t for _, t in tables])
        if self.time is not None:
            table[: sizes[0]] += self.time.bias
        return table, sizes, np.cumsum(sizes) - sizes

    def _lookup_fused(self, batch: dict[str, Tensor], packing: Packing) -> Tensor:
        """``forward`` in inference (no autograd: a padding_idx row would get no gradient, a
        concatenated table would give it one) in two tensor calls instead of one lookup and one
        addition per table (the per-call overhead, not the arithmetic, is what a served user's
        sequence pays): one embedding_bag over the tables stacked end to end, the time
        projection's bias folded into the first table (every event sums exactly one of its rows),
        then the time projection added by one addmm. Same rows, same sum up to float rounding;
        an id outside its table raises, as ``nn.Embedding`` does. The ids are shifted into the
        stacked table in numpy (a few small arrays: cheaper than as tensors, as in
        ``Packing.of``). The stacked table is built on every call unless the module is frozen for
        serving (`freeze`): a fused optimiser step (`torch.optim.AdamW(fused=True)`, what training
        uses) updates the weights without bumping their version counters, so no cheap test can
        tell that a copy kept otherwise went stale (a kept table once made every validation loss
        after the first epoch wrong)."""
        table, sizes, starts = self._frozen or self._stacked_table()
        keys = dict.fromkeys(key for key, _ in self._tables())  # cat_ids [B, L, C], then the positions [B, L]
        columns = [batch[key].cpu().numpy().reshape(*batch[key].shape[:2], -1) for key in keys]
        ids = packing.pack(torch.from_numpy(np.concatenate(columns, axis=-1))).numpy()  # [N, K]
        if ids.size and (ids.min() < 0 or (ids.max(axis=0) >= sizes).any()):
            raise IndexError(f"an embedding id is outside its table (table sizes {sizes.tolist()})")
        n, k = ids.shape
        shifted, bags = (torch.from_numpy(a).to(table.device) for a in ((ids + starts).ravel(), np.arange(0, n * k, k)))
        x = F.embedding_bag(shifted, table, bags, mode="sum")  # [N, D]: bag i = event i's K rows (+ the bias)
        if self.time is None:
            return x
        return torch.addmm(x, packing.pack(batch["time_features"]), self.time.weight.t())


class SequenceUserModel(nn.Module):
    """Shared by TRACE and its baselines: pooled sequence -> user embedding -> task logits.

    Subclasses implement ``pool(batch) -> [B, H]`` and set ``self.pooled_dim``.
    """

    pooled_dim: int
    # Per-event layers run on real events only (packing.py); False = on every padded slot, the
    # reference computation (same results up to float rounding, same dropout masks).
    packed_events: bool = True

    def _init_heads(self, embedding_dim: int, n_tasks: int, class_weighting: str) -> None:
        if class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {class_weighting!r}")
        self.class_weighting = class_weighting
        self.shared = nn.Linear(self.pooled_dim, embedding_dim)
        self.heads = nn.Linear(embedding_dim, n_tasks)  # row t of the weight = head of task t
        # saved in the state dict, so a loaded model computes the same loss
        self.register_buffer("class_weights", torch.ones(n_tasks, 2))

    def set_class_weights(self, labels: Tensor) -> Tensor:
        """Set the loss weights from the training labels [N, T] (NaN = missing)."""
        self.class_weights.copy_(class_weights_from_labels(labels, self.class_weighting))
        return self.class_weights

    def pool(self, batch: dict[str, Tensor]) -> Tensor:  # [B, H]
        raise NotImplementedError

    def freeze(self) -> None:
        """Fixed for serving: eval mode, no gradients, lookup tables stacked once
        (`EventEmbedding.freeze`). `train()` makes it trainable-shaped again (tables unstacked);
        the weights then still need `requires_grad_(True)` to learn."""
        self.eval()
        self.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, EventEmbedding):
                module.freeze()

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """User embedding [B, E]: the output of the shared dense layer."""
        return F.gelu(self.shared(self.pool(batch)))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Task logits [B, T]."""
        return self.heads(self.embed(batch))

    def predict_proba(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.sigmoid(self.forward(batch))  # [B, T]

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return weighted_multitask_bce(self.forward(batch), batch["labels"].float(), self.class_weights)


class TRACE(SequenceUserModel):
    def __init__(self, config: TRACEConfig):
        super().__init__()
        self.config = c = config
        self.embedding = EventEmbedding(
            c.vocab_sizes,
            c.n_time_features,
            c.d_model,
            max_len=c.max_len if c.use_event_positions else 0,
            max_sessions=c.max_sessions if c.use_session_positions else 0,
            position_encoding=c.position_encoding,
        )
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.pooled_dim = c.d_model
        self._init_heads(c.embedding_dim, c.n_tasks, c.class_weighting)

    def pool(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["mask"]
        # (the mask checked in numpy: as a request's first tensor op, `all` costs it ~0.05 ms)
        if self.packed_events and not self.training and not torch.is_grad_enabled() and mask.cpu().numpy().all():
            return self._infer_unpadded(batch)
        packing = Packing.of(attention_mask(mask), packed=self.packed_events, group_ratio=ATTENTION_GROUP_LENGTH_RATIO)
        x = packing.dropout(self.drop, self.embedding(batch, packing))  # [N, D]: the real events
        for block in self.blocks:
            x = block(x, packing)
        return packing.max_pool(self.ln_f(x))  # [B, D]

    def _infer_unpadded(self, batch: dict[str, Tensor]) -> Tensor:
        """``pool`` in inference of a batch without padding: a served user's sequence (trimmed to
        its events by ``UserModel``) or full-length histories. The same layers, called without
        the packed path's bookkeeping (per-call overhead is most of a served request's forward);
        tests/test_packing.py checks it against the padded computation."""
        B, L = batch["mask"].shape
        x = self.embedding(batch, Packing.unpadded(batch["mask"]))  # every slot carried: index None
        for block in self.blocks:
            x = block.infer_unpadded(x, B, L)
        return self.ln_f(x).view(B, L, -1).amax(dim=1)  # [B, D]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """Fixed sin/cos position table [n_positions, dim] (Vaswani et al. 2017)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


__all__ = [
    "POSITION_ENCODINGS",
    "TRACE",
    "Block",
    "EventEmbedding",
    "FixedPositions",
    "SelfAttention",
    "SequenceUserModel",
    "TRACEConfig",
    "attention_mask",
    "class_weights_from_labels",
    "count_parameters",
    "masked_max_pool",
    "sinusoidal_table",
    "weighted_multitask_bce",
]
