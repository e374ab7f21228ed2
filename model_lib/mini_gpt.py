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

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # each [B, L, D]
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # [B, H, L, Dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, L, Dh]
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class CausalBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


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

    def hidden(self, batch: dict[str, Tensor]) -> Tensor:
        """Causal hidden states [B, L, D]."""
        pages = batch["cat_ids"][..., 0].long()  # [B, L]
        positions = torch.arange(pages.shape[1], device=pages.device)  # [L], chronological
        x = self.drop(self.wte(pages) + self.wpe(positions))  # [B, L, D]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def _last_real(self, batch: dict[str, Tensor]) -> Tensor:
        return attention_mask(batch["mask"]).sum(1) - 1  # [B] index of the most recent event

    def pool(self, batch: dict[str, Tensor]) -> Tensor:
        h = self.hidden(batch)  # [B, L, D]
        return h[torch.arange(h.shape[0]), self._last_real(batch)]  # [B, D]

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        h = self.hidden(batch)  # [B, L, D]
        pooled = h[torch.arange(h.shape[0]), self._last_real(batch)]
        logits = self.heads(F.gelu(self.shared(pooled)))  # [B, T]
        task_loss = weighted_multitask_bce(logits, batch["labels"].float(), self.class_weights)
        if self.config.lm_weight <= 0:
            return task_loss
        pages = batch["cat_ids"][..., 0].long()
        next_logits = h[:, :-1] @ self.wte.weight.T  # [B, L-1, V], head tied to the token embedding
        target = pages[:, 1:].masked_fill(~batch["mask"][:, 1:], -100)  # padding is not a target
        if not (target >= 0).any():
            return task_loss
        lm_loss = F.cross_entropy(next_logits.reshape(-1, next_logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return task_loss + self.config.lm_weight * lm_loss


__all__ = ["CausalBlock", "CausalSelfAttention", "MiniGPT", "MiniGPTConfig"]
