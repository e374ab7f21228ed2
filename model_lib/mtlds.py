"""MTLDS: multi-task post-click conversion with differentiable sorting (arXiv 2307.09089).

A shared bottom, one tower per behaviour, an aggregation operator that turns the funnel tasks'
probabilities into one ranking score, and a SoftSort relaxation (Prillo & Eisenschlos 2020)
that is trained to reproduce the order of the behaviours:

    loss = sum_t BCE(p_t, y_t) + lambda * permutation_loss(SoftSort(agg(p)), true order)

What the paper leaves open, and what we chose (config fields in brackets):

- *What is sorted.* Samples, not tasks: a batch (shuffled by the training loop) is cut into
  lists of ``list_size`` samples; within a list SoftSort sorts the aggregated scores
  ``s_i = agg(p_i1, ..., p_iK)``. The true order ranks the samples by their funnel depth,
  i.e. how far down the ordered label sequence the user went with the item (0 = viewed only,
  t = deepest funnel stage t reached, counting in the funnel's order). This is what makes the
  aggregation operator matter, and what the paper's remark that mul/max/sum "fail to
  distinguish certain behaviour sequences" refers to. Lists mix users on purpose: a score that
  orders all samples by depth also orders each user's items, which is what NDCG measures.
- *Permutation loss.* Cross-entropy between the rows of the SoftSort matrix P (row i: which
  sample sits at predicted rank i) and the true permutation matrix (row i: the sample at true
  rank i): ``-mean_i log sum_{j in G_i} P_ij``.
- *Ties.* Depths tie a lot (most samples are view-only), and the order inside a tie is not
  defined. ``G_i`` is the set of samples whose depth equals the depth at true rank i, so the loss
  only asks that rank i be taken by *some* sample of the right depth; with no ties it is the
  plain cross-entropy. A list whose samples all tie carries no order and contributes 0; the
  loss is averaged over the rows of the lists that do carry an order.
- *Violated order.* On real data a purchase often has no preceding cart. Depth counts the
  deepest stage reached, so such a sample still ranks above a cart-only one, and each tower is
  still trained on its own raw label.
- *Aggregated inputs.* Probabilities (not logits), so that mul and max mean what they say.
  Only the funnel tasks are aggregated; extra labels (Taobao ``fav``) have no place in the
  order and are trained by BCE alone. The linear weights start at 1 (the sum operator), so
  any departure from sum is learned.
- *Temperature* ``tau`` = 1 and distance power ``softsort_power`` = 1, the defaults of Prillo &
  Eisenschlos, and ``perm_weight`` (lambda) = 1. Mind the scale: the scores are probabilities
  of rare events (~1% on Taobao), so at tau = 1 the rows of P are nearly uniform and the term
  is weak. On the Taobao slice (validation users carved out of the training users, 3 seeds,
  linear and sum) no setting beat lambda = 0: tau = 1 or lambda = 0.1 were within noise
  (NDCG 0.370-0.377), and the sharp settings (tau <= 0.1 with lambda = 1) lowered NDCG to
  0.356-0.367. Sensitivity to tau is one of the paper's open questions; re-tune on new data.

Ablation switches (defaults = the model above): ``perm_weight`` = 0 (no sorting term), ``tau``,
``nonnegative_weights`` (linear weights constrained >= 0 through a softplus),
``relevance="label_aggregation"`` (the true order from the aggregation operator applied to the
label vectors instead of the funnel depth) and ``task_bce=False`` (the permutation loss alone,
without per-task BCE: what the paper's "no extra loss per added label" suggests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_lib.funnel_samples import FunnelSpec, dense_width
from model_lib.metrics import auroc, ndcg_at_k
from model_lib.training import iterate_batches

AGGREGATIONS = ("linear", "mul", "max", "sum")
RELEVANCES = ("funnel_depth", "label_aggregation")
_AGGREGATION_ALIASES = {"multiplicative": "mul", "product": "mul"}


def canonical_aggregation(name: str) -> str:
    kind = _AGGREGATION_ALIASES.get(name, name)
    if kind not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; expected one of {AGGREGATIONS}")
    return kind


@dataclass
class MTLDSConfig:
    """Every knob of MTLDS and of its baselines (they share inputs, widths and tasks)."""

    funnel_tasks: tuple[str, ...] = ("cart", "buy")  # ordered label stages after the entry stage
    extra_tasks: tuple[str, ...] = ()  # labels outside the order: BCE only
    # inputs (see funnel_samples.samples_to_tensors)
    user_buckets: int = 2**14
    item_buckets: int = 2**16
    category_buckets: int = 2**12
    dense_features: int = 13
    user_embedding_dim: int = 0  # width of an optional dense user embedding (e.g. TRACE), 0 = none
    # hashed ids to embed: "user" only helps for users seen in training; "item" overfits when
    # items rarely repeat (Taobao slice: 60k items in 95k events)
    id_features: tuple[str, ...] = ("item", "category")  # no "user": splits are by user
    embed_dim: int = 16
    # network
    bottom: tuple[int, ...] = (128, 64)  # shared bottom (MMoE: each expert; single-task: each net)
    tower: tuple[int, ...] = (32,)
    dropout: float = 0.0
    n_experts: int = 4  # MMoE only
    # aggregation and differentiable sorting
    aggregation: str = "linear"  # linear | mul | max | sum
    tau: float = 1.0  # SoftSort temperature
    softsort_power: float = 1.0  # p in |sort(s) 1^T - 1 s^T|^p
    perm_weight: float = 1.0  # lambda; 0 disables the permutation loss
    list_size: int = 32  # samples per sorted list
    # ablation switches (defaults = the model above)
    nonnegative_weights: bool = False  # linear weights w = softplus(v) >= 0 (start at 1)
    relevance: str = "funnel_depth"  # or "label_aggregation": agg(label vector), as the paper motivates
    task_bce: bool = True  # False: the permutation loss alone trains the towers (no per-task BCE)

    def __post_init__(self):
        self.funnel_tasks, self.extra_tasks = tuple(self.funnel_tasks), tuple(self.extra_tasks)
        self.bottom, self.tower = tuple(self.bottom), tuple(self.tower)
        self.id_features = tuple(self.id_features)
        if unknown := set(self.id_features) - {"user", "item", "category"}:
            raise ValueError(f"unknown id features {sorted(unknown)}")
        self.aggregation = canonical_aggregation(self.aggregation)
        if not self.funnel_tasks:
            raise ValueError("funnel_tasks must name at least one stage")
        if self.relevance not in RELEVANCES:
            raise ValueError(f"relevance must be one of {RELEVANCES}, got {self.relevance!r}")
        if not self.task_bce and self.perm_weight <= 0:
            raise ValueError("task_bce=False needs perm_weight > 0: nothing would train the towers")
        if self.tau <= 0 or self.list_size < 2:
            raise ValueError(f"need tau > 0 and list_size >= 2, got tau={self.tau}, list_size={self.list_size}")

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.funnel_tasks + self.extra_tasks

    @classmethod
    def from_spec(cls, spec: FunnelSpec, **overrides) -> MTLDSConfig:
        """Tasks and vocabulary sizes from a ``funnel_samples.FunnelSpec``."""
        base = dict(
            funnel_tasks=spec.funnel_tasks,
            extra_tasks=spec.extra_labels,
            user_buckets=spec.user_buckets,
            item_buckets=spec.item_buckets,
            category_buckets=spec.category_buckets,
            dense_features=dense_width(spec),
        )
        return cls(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------
# SoftSort and the permutation loss


def softsort(scores: Tensor, tau: float = 1.0, power: float = 1.0) -> Tensor:
    """SoftSort relaxation of the permutation that sorts ``scores`` in descending order.

    scores [..., n] -> P [..., n, n], P = softmax(-|sort(s) 1^T - 1 s^T|^power / tau) row-wise.
    Row i is a soft one-hot of the item at rank i; as tau -> 0, P -> the hard permutation matrix.
    """
    ranked = scores.sort(dim=-1, descending=True).values  # [..., n]
    return torch.softmax(_softsort_logits(ranked, scores, tau, power), dim=-1)


def _softsort_logits(ranked: Tensor, scores: Tensor, tau: float, power: float) -> Tensor:
    dist = (ranked.unsqueeze(-1) - scores.unsqueeze(-2)).abs().pow(power)  # [..., n, n]
    return -dist / tau


def funnel_depth(labels: Tensor) -> Tensor:
    """Deepest funnel stage reached: labels [..., K] (columns in funnel order) -> [...] in 0..K.

    0 = no stage after the entry; t = stage t (1-based) is the deepest with a positive label,
    whether or not the earlier stages were observed (a purchase without a cart is depth K).
    """
    stage = torch.arange(1, labels.shape[-1] + 1, device=labels.device, dtype=labels.dtype)  # [K]
    return (labels * stage).amax(dim=-1)


def target_permutation(relevance: Tensor) -> Tensor:
    """True permutation matrix for a descending sort of ``relevance`` [..., n] -> [..., n, n].

    Row i is uniform over the items whose relevance equals the i-th largest (one-hot without
    ties): inside a tie the order is undefined, so no item of the tie is preferred.
    """
    ranked = relevance.sort(dim=-1, descending=True).values  # [..., n]
    same = (ranked.unsqueeze(-1) == relevance.unsqueeze(-2)).to(torch.float32)  # [..., n, n]
    return same / same.sum(dim=-1, keepdim=True)


def permutation_loss(scores: Tensor, relevance: Tensor, tau: float = 1.0, power: float = 1.0) -> Tensor:
    """``-mean_i log sum_{j in G_i} P_ij`` over the lists that carry an order (module docstring).

    scores, relevance [L, n] (L lists of n items) -> scalar. 0 (with a graph) when every list
    ties completely.
    """
    ranked = scores.sort(dim=-1, descending=True).values  # [L, n]
    logits = _softsort_logits(ranked, scores, tau, power)  # [L, n, n]
    allowed = target_permutation(relevance) > 0  # [L, n, n]
    log_p_group = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1) - torch.logsumexp(
        logits, dim=-1
    )  # [L, n]
    ordered = relevance.amax(dim=-1) > relevance.amin(dim=-1)  # [L]
    if not bool(ordered.any()):
        return scores.sum() * 0.0
    return -log_p_group[ordered].mean()


# ---------------------------------------------------------------------------------------------
# Aggregation operator


class Aggregation(nn.Module):
    """Per-task probabilities [B, K] (funnel order) -> one score [B].

    linear: sum_t w_t p_t, w learned (starts at 1); mul: prod_t p_t; max: max_t p_t; sum: sum_t p_t.
    On exact 0/1 label sequences, mul, max and sum each give equal scores to sequences of
    different depth (tests/test_softsort.py); distinct linear weights such as (1, 2, 4) do not.
    SoftSort cannot break an *exact* score tie (the gradient of |s_i - s_j| at 0 is 0), which
    predicted probabilities never have.
    """

    def __init__(self, kind: str, n_tasks: int, nonnegative: bool = False):
        super().__init__()
        self.kind = canonical_aggregation(kind)
        self.nonnegative = nonnegative
        # nonnegative: w = softplus(v), v starting at softplus^-1(1) so that w starts at 1 as well
        start = math.log(math.e - 1.0) if nonnegative else 1.0
        self.weight = nn.Parameter(torch.full((n_tasks,), start)) if self.kind == "linear" else None

    @property
    def weights(self) -> Tensor | None:
        """The linear weights as applied (after the >= 0 constraint), None for other kinds."""
        if self.weight is None:
            return None
        return F.softplus(self.weight) if self.nonnegative else self.weight

    def forward(self, probs: Tensor) -> Tensor:
        if self.kind == "linear":
            return probs @ self.weights
        if self.kind == "mul":
            return probs.prod(dim=-1)
        if self.kind == "max":
            return probs.amax(dim=-1)
        return probs.sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Shared pieces of every funnel model


def mlp(in_dim: int, widths: tuple[int, ...], dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU(-Dropout) stack; output width widths[-1] (in_dim if widths is empty)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)


class FunnelInput(nn.Module):
    """Sample tensors -> one input vector per sample [B, out_dim]: id and time embeddings,
    dense past-only counts and the optional user embedding, concatenated."""

    def __init__(self, cfg: MTLDSConfig):
        super().__init__()
        buckets = {"user": cfg.user_buckets, "item": cfg.item_buckets, "category": cfg.category_buckets}
        sizes = {name: buckets[name] for name in cfg.id_features} | {"hour": 24, "weekday": 7}
        self.embeddings = nn.ModuleDict({name: nn.Embedding(n, cfg.embed_dim) for name, n in sizes.items()})
        for emb in self.embeddings.values():
            nn.init.normal_(emb.weight, std=0.05)  # small: rows of ids never seen in training stay near 0
        self.user_embedding_dim = cfg.user_embedding_dim
        self.out_dim = cfg.embed_dim * len(sizes) + cfg.dense_features + cfg.user_embedding_dim

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        parts = [emb(batch[name]) for name, emb in self.embeddings.items()]  # each [B, d]
        parts.append(batch["dense"])  # [B, F]
        if self.user_embedding_dim:
            parts.append(batch["user_embedding"])  # [B, D]
        return torch.cat(parts, dim=-1)  # [B, out_dim]


class FunnelModel(nn.Module):
    """Base of MTLDS and its baselines: per-task logits in ``cfg.tasks`` order, the summed
    per-task BCE, and a ranking score.

    Subclasses implement ``task_logits(batch) -> [B, T]``. ``task_probs`` gives the
    probability each model reports per task (ESMM overrides it); ``rank_score`` is what NDCG
    ranks by: the aggregated score for MTLDS; for the baselines the sum of the funnel
    probabilities, i.e. the expected funnel depth when the funnel order holds (E[depth] =
    sum_t P(depth >= t)).
    """

    def __init__(self, cfg: MTLDSConfig):
        super().__init__()
        self.cfg = cfg
        self.n_funnel = len(cfg.funnel_tasks)

    def task_logits(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def task_probs(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.sigmoid(self.task_logits(batch))  # [B, T]

    def rank_score(self, batch: dict[str, Tensor], probs: Tensor | None = None) -> Tensor:
        probs = self.task_probs(batch) if probs is None else probs
        return probs[:, : self.n_funnel].sum(dim=-1)  # [B]

    def bce(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-task mean BCE, summed over tasks (each task counts the same, as in the paper)."""
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0).sum()

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.bce(self.task_logits(batch), batch["labels"])


class SharedBottomTowers(nn.Module):
    """Input -> shared bottom MLP -> one tower and one logit per task: x [B, in] -> [B, T]."""

    def __init__(self, in_dim: int, cfg: MTLDSConfig):
        super().__init__()
        self.bottom = mlp(in_dim, cfg.bottom, cfg.dropout)
        width = cfg.bottom[-1] if cfg.bottom else in_dim
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(width, cfg.tower, cfg.dropout), nn.Linear(cfg.tower[-1] if cfg.tower else width, 1))
            for _ in cfg.tasks
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.bottom(x)  # [B, H]
        return torch.cat([tower(h) for tower in self.towers], dim=-1)  # [B, T]


# ---------------------------------------------------------------------------------------------
# MTLDS


class MTLDS(FunnelModel):
    """Shared bottom + towers, aggregation operator, SoftSort permutation loss."""

    def __init__(self, cfg: MTLDSConfig):
        super().__init__(cfg)
        self.input = FunnelInput(cfg)
        self.net = SharedBottomTowers(self.input.out_dim, cfg)
        self.aggregate = Aggregation(cfg.aggregation, self.n_funnel, nonnegative=cfg.nonnegative_weights)

    def task_logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(self.input(batch))  # [B, T]

    def rank_score(self, batch: dict[str, Tensor], probs: Tensor | None = None) -> Tensor:
        probs = self.task_probs(batch) if probs is None else probs
        return self.aggregate(probs[:, : self.n_funnel])  # [B]

    def ranking_loss(self, probs: Tensor, labels: Tensor) -> Tensor:
        """SoftSort permutation loss over lists of ``list_size`` consecutive samples of the
        batch (the remainder that does not fill a list is left out). probs, labels [B, T]."""
        n = self.cfg.list_size
        usable = probs.shape[0] // n * n
        if usable == 0:
            return probs.sum() * 0.0
        scores = self.aggregate(probs[:usable, : self.n_funnel]).view(-1, n)  # [L, n]
        relevance = self.relevance(labels[:usable, : self.n_funnel]).view(-1, n)  # [L, n]
        return permutation_loss(scores, relevance, self.cfg.tau, self.cfg.softsort_power)

    def relevance(self, funnel_labels: Tensor) -> Tensor:
        """True order of the samples: funnel depth (default), or the aggregation operator applied
        to the label vector itself (``relevance="label_aggregation"``, the paper's motivation; the
        learned linear weights are detached so that the target cannot move to meet the scores).
        funnel_labels [B, K] -> [B]."""
        if self.cfg.relevance == "funnel_depth":
            return funnel_depth(funnel_labels)
        with torch.no_grad():
            return self.aggregate(funnel_labels)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.task_logits(batch)  # [B, T]
        loss = self.bce(logits, batch["labels"]) if self.cfg.task_bce else logits.sum() * 0.0
        if self.cfg.perm_weight > 0:
            loss = loss + self.cfg.perm_weight * self.ranking_loss(torch.sigmoid(logits), batch["labels"])
        return loss


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(model: FunnelModel, data: dict[str, Tensor], batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(per-task probabilities [N, T], ranking scores [N]) in eval mode."""
    was_training = model.training
    model.eval()
    probs, scores = [], []
    for batch in iterate_batches(data, batch_size):
        p = model.task_probs(batch)
        probs.append(p)
        scores.append(model.rank_score(batch, p))
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(scores).numpy()


def per_user_ndcg(
    groups: np.ndarray, relevance: np.ndarray, scores: np.ndarray, k: int | None = None, seed: int = 0
) -> float:
    """NDCG@k of each user's items ranked by ``scores``, averaged over users with a relevant item.

    Lists are padded (relevance 0, score -inf: ranked last, no gain). Items are shuffled within
    each list first, because ``ndcg_at_k`` breaks score ties by position and the sample order
    (by time) must not decide ties.
    """
    rel_m, sc_m = _user_lists(groups, relevance, scores, seed)
    return ndcg_at_k(rel_m, sc_m, k=k)


def _user_lists(groups: np.ndarray, relevance: np.ndarray, scores: np.ndarray, seed: int) -> tuple:
    """Padded [n_users, max_items] relevance and score matrices, one row per group code (sorted),
    items shuffled within each row (see ``per_user_ndcg``)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    order = order[np.argsort(groups[order], kind="stable")]  # grouped by user, shuffled within
    g, rel, sc = groups[order], relevance[order], scores[order]
    _, starts, counts = np.unique(g, return_index=True, return_counts=True)
    pos = np.arange(len(g)) - np.repeat(starts, counts)  # position within its list
    row = np.repeat(np.arange(len(starts)), counts)
    rel_m = np.zeros((len(starts), counts.max()))
    sc_m = np.full((len(starts), counts.max()), -np.inf)
    rel_m[row, pos], sc_m[row, pos] = rel, sc
    return rel_m, sc_m


def per_user_ndcg_values(
    groups: np.ndarray, relevance: np.ndarray, scores: np.ndarray, k: int | None = None, seed: int = 0
) -> np.ndarray:
    """NDCG@k of each user's list: [n_users] in the order of the sorted group codes, NaN for users
    without a relevant item. Its nanmean is ``per_user_ndcg``; the values let intervals resample
    users."""
    rel_m, sc_m = _user_lists(groups, relevance, scores, seed)
    return np.array([ndcg_at_k(r[None], s[None], k=k) for r, s in zip(rel_m, sc_m)], dtype=np.float64)


def evaluate(model: FunnelModel, data: dict[str, Tensor], k: int | None = None, batch_size: int = 4096) -> dict:
    """Per-task AUC and per-user NDCG of the funnel order.

    ``{"auc": {task: AUROC}, "ndcg": float}``. NDCG: each user's samples (``data["group"]``)
    are ranked by ``model.rank_score``; relevance is the funnel depth (0..K), gain 2^depth - 1,
    discount 1/log2(rank + 1), cut-off ``k`` (None = the whole list); users without any sample
    past the entry stage are excluded (ideal DCG 0). NaN where a metric is undefined.
    """
    probs, scores = predict(model, data, batch_size)
    labels = data["labels"].numpy()
    cfg = model.cfg
    depth = funnel_depth(data["labels"][:, : len(cfg.funnel_tasks)]).numpy()
    return {
        "auc": {task: auroc(labels[:, t], probs[:, t]) for t, task in enumerate(cfg.tasks)},
        "ndcg": per_user_ndcg(data["group"].numpy(), depth, scores, k=k),
    }


__all__ = [
    "AGGREGATIONS",
    "MTLDS",
    "RELEVANCES",
    "Aggregation",
    "FunnelInput",
    "FunnelModel",
    "MTLDSConfig",
    "SharedBottomTowers",
    "evaluate",
    "funnel_depth",
    "mlp",
    "per_user_ndcg",
    "per_user_ndcg_values",
    "permutation_loss",
    "predict",
    "softsort",
    "target_permutation",
]
