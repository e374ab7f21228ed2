"""Evaluation metrics shared by the TRACE and MTLDS families: numpy in, python float out.

Conventions (so that every caller treats edge cases the same way):
- Rows whose ``y_true`` is NaN are *missing labels* and are dropped before scoring.
- ``auroc`` is NaN when only one class is present (AUROC is undefined there); ``auprc`` is NaN
  when there is no positive. NaN results are skipped by the bootstrap, never counted as 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _clean(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true and y_score differ in length: {y_true.shape} vs {y_score.shape}")
    keep = ~np.isnan(y_true)
    return y_true[keep], y_score[keep]


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve; NaN when fewer than two classes are present."""
    y_true, y_score = _clean(y_true, y_score)
    positive = y_true > 0
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties: equal to sklearn's roc_auc_score, ~50x faster
    # on a thousand rows, which is what makes thousands of bootstrap replicates affordable.
    ranks = rankdata(y_score, method="average")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auprc(y_true, y_score) -> float:
    """Average precision (sklearn's step-wise area under the precision-recall curve);
    NaN when there is no positive."""
    y_true, y_score = _clean(y_true, y_score)
    positive = (y_true > 0).astype(np.float64)
    if y_true.size == 0 or not positive.any():
        return float("nan")
    # sklearn's definition: one threshold per distinct score, AP = sum (R_n - R_{n-1}) P_n.
    order = np.argsort(-y_score, kind="mergesort")
    score, hit = y_score[order], positive[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
    true_pos = np.cumsum(hit)[last_of_each_score]
    precision = true_pos / (last_of_each_score + 1)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def uplift_pct(value: float, baseline: float) -> float:
    """Relative improvement in percent, ``100 * (value - baseline) / baseline`` (the papers'
    "uplift"); NaN when the baseline is 0 or not finite."""
    if not np.isfinite(baseline) or baseline == 0:
        return float("nan")
    return float(100.0 * (value - baseline) / baseline)


def _percentile_interval(samples: list[float], alpha: float) -> tuple[float, float]:
    arr = np.asarray(samples, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(arr, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    metric_fn: MetricFn, y_true, y_score, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval of ``metric_fn`` over resampled rows."""
    y_true, y_score = _clean(y_true, y_score)
    rng = np.random.default_rng(seed)
    n = y_true.size
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        samples.append(metric_fn(y_true[idx], y_score[idx]))
    return _percentile_interval(samples, alpha)


def paired_bootstrap_uplift_ci(
    metric_fn: MetricFn,
    y_true,
    score_model,
    score_baseline,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(uplift %, low, high)`` of the model over the baseline.

    Both models are scored on the *same* resampled rows in each replicate, so the interval
    reflects the difference between the models rather than the noise of the test set.
    """
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    score_model = np.asarray(score_model, dtype=np.float64).ravel()
    score_baseline = np.asarray(score_baseline, dtype=np.float64).ravel()
    if not (y_true.shape == score_model.shape == score_baseline.shape):
        raise ValueError("y_true, score_model and score_baseline must have the same length")
    keep = ~np.isnan(y_true)
    y_true, score_model, score_baseline = y_true[keep], score_model[keep], score_baseline[keep]
    point = uplift_pct(metric_fn(y_true, score_model), metric_fn(y_true, score_baseline))
    rng = np.random.default_rng(seed)
    n = y_true.size
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        samples.append(
            uplift_pct(metric_fn(y_true[idx], score_model[idx]), metric_fn(y_true[idx], score_baseline[idx]))
        )
    low, high = _percentile_interval(samples, alpha)
    return point, low, high


def ndcg_at_k(true_relevance: np.ndarray, scores: np.ndarray, k: int | None = None) -> float:
    """Mean NDCG@k over lists (rows of ``[n_lists, list_len]`` arrays).

    Gain ``2**rel - 1``, discount ``1 / log2(rank + 1)`` with 1-based ranks. Ties in ``scores``
    keep their original position (stable sort), so the result is deterministic. Lists whose
    ideal DCG is 0 (no relevant item) are excluded from the mean; NaN if every list is.
    """
    rel = np.atleast_2d(np.asarray(true_relevance, dtype=np.float64))
    sc = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if rel.shape != sc.shape:
        raise ValueError(f"true_relevance and scores differ in shape: {rel.shape} vs {sc.shape}")
    list_len = rel.shape[1]
    k = list_len if k is None else min(int(k), list_len)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]
    order = np.argsort(-sc, axis=1, kind="stable")[:, :k]  # [n_lists, k]
    gains = np.power(2.0, np.take_along_axis(rel, order, axis=1)) - 1.0
    dcg = gains @ discount  # [n_lists]
    ideal = -np.sort(-rel, axis=1)[:, :k]
    idcg = (np.power(2.0, ideal) - 1.0) @ discount
    valid = idcg > 0
    if not np.any(valid):
        return float("nan")
    return float(np.mean(dcg[valid] / idcg[valid]))


__all__ = ["auprc", "auroc", "bootstrap_ci", "ndcg_at_k", "paired_bootstrap_uplift_ci", "uplift_pct"]
