"""Baselines for MTLDS on the same samples, inputs, loss convention and training loop.

- ``single_task``: one independent network per label (input embeddings included). Trained
  as one module whose sub-networks share no parameter, which equals separate models except
  for two couplings of the shared loop: one early-stopping epoch for all tasks, and gradient
  clipping by the global norm over all of them.
- ``shared_bottom``: hard parameter sharing (the MTLDS network without aggregation and SoftSort).
- ``esmm`` (Ma et al. 2018): over the entire space of viewed items, pCTCVR = pCTR x pCVR,
  generalised to a funnel of K stages as a chain of conditional towers,
  P(reach stage t) = prod_{s<=t} P(stage s | stage s-1). With the Taobao funnel
  pv -> cart -> buy, "click" maps to cart and "conversion" to buy: pCTR = P(cart | view),
  pCVR = P(buy | cart), pCTCVR = P(buy | view). Each P(reach t) is trained with BCE on
  "depth >= t", so a purchase without a recorded cart counts as having passed the cart
  stage: a chain cannot represent it otherwise. The reported probability of funnel task t is
  P(reach t) (for cart, this also scores direct purchases: ESMM's notion of the stage).
  Towers share only the embeddings, as in the paper; extra labels get plain towers.
- ``mmoe`` (Ma et al. 2018): ``n_experts`` expert MLPs, one softmax gate per task.

``build_model(name, cfg)`` is the factory for every name of the public contract.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_lib.mtlds import (
    AGGREGATIONS,
    MTLDS,
    FunnelInput,
    FunnelModel,
    MTLDSConfig,
    SharedBottomTowers,
    funnel_depth,
    mlp,
)


def _head(in_dim: int, cfg: MTLDSConfig) -> nn.Sequential:
    """Tower MLP + one logit: [B, in_dim] -> [B, 1]."""
    return nn.Sequential(mlp(in_dim, cfg.tower, cfg.dropout), nn.Linear(cfg.tower[-1] if cfg.tower else in_dim, 1))


def _width(in_dim: int, widths: tuple[int, ...]) -> int:
    return widths[-1] if widths else in_dim


class SingleTask(FunnelModel):
    """One fully separate network (embeddings, bottom, tower) per task."""

    def __init__(self, cfg: MTLDSConfig):
        super().__init__(cfg)
        self.inputs = nn.ModuleList(FunnelInput(cfg) for _ in cfg.tasks)
        self.nets = nn.ModuleList(
            nn.Sequential(mlp(inp.out_dim, cfg.bottom, cfg.dropout), _head(_width(inp.out_dim, cfg.bottom), cfg))
            for inp in self.inputs
        )

    def task_logits(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.cat([net(inp(batch)) for inp, net in zip(self.inputs, self.nets)], dim=-1)  # [B, T]


class SharedBottom(FunnelModel):
    """Shared bottom MLP, one tower per task, summed BCE."""

    def __init__(self, cfg: MTLDSConfig):
        super().__init__(cfg)
        self.input = FunnelInput(cfg)
        self.net = SharedBottomTowers(self.input.out_dim, cfg)

    def task_logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(self.input(batch))  # [B, T]


class ESMM(FunnelModel):
    """Entire-space chain of conditional towers (module docstring)."""

    def __init__(self, cfg: MTLDSConfig):
        super().__init__(cfg)
        self.input = FunnelInput(cfg)
        d = self.input.out_dim
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(d, cfg.bottom, cfg.dropout), _head(_width(d, cfg.bottom), cfg)) for _ in cfg.tasks
        )

    def task_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Funnel columns: logits of P(stage t | stage t-1); extra columns: plain logits. [B, T]"""
        x = self.input(batch)
        return torch.cat([tower(x) for tower in self.towers], dim=-1)

    def _log_reach(self, logits: Tensor) -> Tensor:
        return F.logsigmoid(logits[:, : self.n_funnel]).cumsum(dim=-1)  # [B, K] log P(reach t)

    def task_probs(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.task_logits(batch)
        return torch.cat([self._log_reach(logits).exp(), torch.sigmoid(logits[:, self.n_funnel :])], dim=-1)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits, labels = self.task_logits(batch), batch["labels"]
        log_p = self._log_reach(logits)  # [B, K]
        depth = funnel_depth(labels[:, : self.n_funnel])  # [B]
        stage = torch.arange(1, self.n_funnel + 1, dtype=labels.dtype)
        reach = (depth.unsqueeze(-1) >= stage).to(labels.dtype)  # [B, K]
        log_not_p = torch.log(-torch.expm1(log_p.clamp(max=-1e-7)))  # log(1 - p), stable near p = 1
        funnel_loss = -(reach * log_p + (1 - reach) * log_not_p).mean(dim=0).sum()
        return funnel_loss + self.bce(logits[:, self.n_funnel :], labels[:, self.n_funnel :])


class MMoE(FunnelModel):
    """Multi-gate mixture of experts: per task, a softmax gate mixes shared expert outputs."""

    def __init__(self, cfg: MTLDSConfig):
        super().__init__(cfg)
        self.input = FunnelInput(cfg)
        d = self.input.out_dim
        self.experts = nn.ModuleList(mlp(d, cfg.bottom, cfg.dropout) for _ in range(cfg.n_experts))
        self.gates = nn.ModuleList(nn.Linear(d, cfg.n_experts) for _ in cfg.tasks)
        self.towers = nn.ModuleList(_head(_width(d, cfg.bottom), cfg) for _ in cfg.tasks)

    def task_logits(self, batch: dict[str, Tensor]) -> Tensor:
        x = self.input(batch)  # [B, d]
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        logits = []
        for gate, tower in zip(self.gates, self.towers):
            weights = torch.softmax(gate(x), dim=-1).unsqueeze(-1)  # [B, E, 1]
            logits.append(tower((weights * experts).sum(dim=1)))  # [B, 1]
        return torch.cat(logits, dim=-1)  # [B, T]


BASELINES = {"single_task": SingleTask, "shared_bottom": SharedBottom, "esmm": ESMM, "mmoe": MMoE}
MODEL_NAMES = ("mtlds",) + tuple(f"mtlds_{a}" for a in AGGREGATIONS) + tuple(BASELINES)


def build_model(name: str, cfg: MTLDSConfig, seed: int | None = None) -> FunnelModel:
    """Model by its public name: ``mtlds`` (aggregation from cfg), ``mtlds_<aggregation>``
    (linear, mul, max, sum; ``mtlds_multiplicative`` also accepted), or a baseline name.

    With ``seed``, the initial weights are a function of it alone (``training.fit`` seeds only
    after the model exists, so without it the initialisation follows the global RNG state).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if name == "mtlds":
        return MTLDS(cfg)
    if name.startswith("mtlds_"):
        return MTLDS(replace(cfg, aggregation=name.removeprefix("mtlds_")))
    if name in BASELINES:
        return BASELINES[name](cfg)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


__all__ = ["BASELINES", "ESMM", "MODEL_NAMES", "MMoE", "SharedBottom", "SingleTask", "build_model"]
