"""Mini-GPT: a small causal transformer over the event sequence (the TRACE paper's "Mini-GPT").

nanoGPT's shape, sized like TRACE. Per example (B = batch, L = max_len, D = d_model, V = pages):

    x = wte(page ids) + wpe(0 .. L-1)          # page names only, learned absolute positions [B, L, D]
    x = CausalBlock^n_layers(x)                # each event attends to itself and the past only
    h = x at the most recent real event        # the causal summary of the whole window      [B, D]
    u = GELU(Linear(h)); logits = Linear(u)    # the shared user embedding and task heads     [B, T]

What makes it a GPT rather than another encoder: causal attention and a language-model loss.
Besides the class-weighted task BCE shared by every sequence model, ``loss`` adds
``lm_weight`` x the next-page cross-entropy (the head is tied to ``wte``), so the network also
learns to predict the journey it reads. Inputs are what a sequence model of pages sees: no
attributes, no time features, no session positions (those are TRACE's contributions).
Events are left-aligned in chronological order with padding on the right (encoding.py), so the
causal mask never lets a real event see padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_lib.packing import Packing
from model_lib.trace import SequenceUserModel, attention_mask, weighted_multitask_bce


@dataclass
class MiniGPTConfig:
    vocab_sizes: tuple[int, ...] = (16,)  # only the first (event_name) is used
    n_time_features: int = 7  # accepted for a common signature, unused
    n_tasks: int = 5
    max_len: int = 128
    max_sessions: int = 32  # unused
    d_model: int = 32
    n_heads: int = 4
    d_ff: int = 128
    n_layers: int = 2
    dropout: float = 0.1
    embedding_dim: int = 32
    lm_weight: float = 0.5  # weight of the next-page loss next to the task losses; 0 disables it
    class_weighting: str = "balanced"
    task_names: tuple[str, ...] = field(default_factory=tuple)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        D = x.shape[1]  # x [N, D]: packed events
        ys = []
        for qkv in packing.to_groups(self.qkv(x)):  # [B, L, 3D] per group, padding on the right
            B, L, _ = qkv.shape
            q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in qkv.split(D, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, L, Dh]: never sees padding
            ys.append(y.transpose(1, 2).reshape(B, L, D))
        return self.proj(packing.from_groups(ys))  # [N, D]


class CausalBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:  # x [N, D]: packed events
        x = x + packing.dropout(self.drop, self.attn(self.ln1(x), packing))
        return x + packing.dropout(self.drop, self.mlp(self.ln2(x)))


class MiniGPT(SequenceUserModel):
    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_sizes[0], c.d_model, padding_idx=0)
        self.wpe = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(CausalBlock(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.pooled_dim = c.d_model
        self._init_heads(c.embedding_dim, c.n_tasks, c.class_weighting)

    def hidden(self, batch: dict[str, Tensor], packing: Packing) -> Tensor:
        """Causal hidden states [N, D] of the events ``packing`` carries."""
        B, L = packing.shape
        pages = packing.pack(batch["cat_ids"][..., 0]).long()  # [N]
        slots = torch.arange(L, device=packing.mask.device).expand(B, L)  # a slot is a chronological position
        positions = packing.pack(slots)  # [N]
        x = packing.dropout(self.drop, self.wte(pages) + self.wpe(positions))  # [N, D]
        for block in self.blocks:
            x = block(x, packing)
        return self.ln_f(x)

    def _packing(self, batch: dict[str, Tensor]) -> Packing:
        return Packing.of(attention_mask(batch["mask"]), packed=self.packed_events)

    def pool(self, batch: dict[str, Tensor]) -> Tensor:
        packing = self._packing(batch)
        return self.hidden(batch, packing)[packing.last()]  # [B, D]: at the most recent event

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        packing = self._packing(batch)
        h = self.hidden(batch, packing)  # [N, D]
        logits = self.heads(F.gelu(self.shared(h[packing.last()])))  # [B, T]
        task_loss = weighted_multitask_bce(logits, batch["labels"].float(), self.class_weights)
        if self.config.lm_weight <= 0:
            return task_loss
        pages = batch["cat_ids"][..., 0].long()  # [B, L]
        target = torch.full_like(pages, -100)  # the page after each slot; padding is not a target
        target[:, :-1] = pages[:, 1:].masked_fill(~batch["mask"][:, 1:], -100)
        target = packing.pack(target)  # [N]
        if not (target >= 0).any():
            return task_loss
        next_logits = h @ self.wte.weight.T  # [N, V], head tied to the token embedding
        lm_loss = F.cross_entropy(next_logits, target, ignore_index=-100)
        return task_loss + self.config.lm_weight * lm_loss


__all__ = ["CausalBlock", "CausalSelfAttention", "MiniGPT", "MiniGPTConfig"]
