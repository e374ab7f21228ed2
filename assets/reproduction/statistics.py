"""Intervals over several tasks, seeds and test users for the reproduction report.

Built on the protocol's ``model_lib.metrics.GroupResampler`` (users, not rows, are resampled; the
same users for both models: a paired comparison). What this adds is the report's headline
shape: the uplift of the *mean over tasks* of a seed-averaged metric, each bootstrap replicate
drawing the test users once for every task and, independently for each model, its training
seeds with replacement (``model_lib.metrics.seeds_uplift_ci`` is the one-task case); and the
same for a per-user quantity such as per-user NDCG.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from model_lib.metrics import GroupResampler, auroc, uplift_pct

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def seed_mean(metric: MetricFn, y: np.ndarray, scores: np.ndarray, rows=None, seeds=None) -> float:
    """Mean over seeds (rows of ``scores`` [S, N]) of ``metric``, on ``rows`` (all by default)."""
    rows = slice(None) if rows is None else rows
    seeds = range(scores.shape[0]) if seeds is None else seeds
    values = [metric(y[rows], scores[s][rows]) for s in seeds]
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def paired_uplift(
    ys: list[np.ndarray],
    model: list[np.ndarray],
    baseline: list[np.ndarray],
    users: np.ndarray,
    metric: MetricFn = auroc,
    n_boot: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Uplift (%) of the model's mean metric over tasks against the baseline's, with a user- and
    seed-resampling interval.

    ``ys``: one label vector [N] per task (NaN = no label); ``model``/``baseline``: one score
    matrix [S, N] per task (S seeds each; the two may differ in S); ``users`` [N] the user of each
    row (the same rows for every task). Returns point, low, high, the two means, and the seed
    sd of each model's mean (the "mean +- sd" of the protocol).
    """
    n_model, n_base = model[0].shape[0], baseline[0].shape[0]

    def mean_over_tasks(scores, rows, seeds):
        return float(np.nanmean([seed_mean(metric, y, s, rows, seeds) for y, s in zip(ys, scores)]))

    point_m = mean_over_tasks(model, None, None)
    point_b = mean_over_tasks(baseline, None, None)
    per_seed_m = [mean_over_tasks(model, None, [s]) for s in range(n_model)]
    per_seed_b = [mean_over_tasks(baseline, None, [s]) for s in range(n_base)]
    resampler = GroupResampler(np.asarray(users).astype(str), len(users))
    seed_rng = np.random.default_rng(seed + 1)
    samples = []
    for rows in resampler.replicates(n_boot, seed):
        seeds_m = seed_rng.integers(0, n_model, n_model)
        seeds_b = seed_rng.integers(0, n_base, n_base)
        samples.append(uplift_pct(mean_over_tasks(model, rows, seeds_m), mean_over_tasks(baseline, rows, seeds_b)))
    arr = np.asarray(samples)
    arr = arr[np.isfinite(arr)]
    low, high = np.quantile(arr, [alpha / 2, 1 - alpha / 2]) if arr.size else (np.nan, np.nan)
    return {
        "uplift_pct": uplift_pct(point_m, point_b),
        "ci_low": float(low),
        "ci_high": float(high),
        "value": point_m,
        "baseline_value": point_b,
        "value_sd": float(np.std(per_seed_m, ddof=1)) if n_model > 1 else float("nan"),
        "baseline_sd": float(np.std(per_seed_b, ddof=1)) if n_base > 1 else float("nan"),
        "seeds": n_model,
        "baseline_seeds": n_base,
        "users": resampler.n_groups,
    }


def paired_user_mean_uplift(
    model: np.ndarray, baseline: np.ndarray, n_boot: int = 500, alpha: float = 0.05, seed: int = 0
) -> dict:
    """Uplift (%) of a per-user quantity's mean (e.g. per-user NDCG), [S, U] per model, same users
    in the same column order; NaN entries (users without a defined value) are skipped."""
    rng = np.random.default_rng(seed)
    n_users = model.shape[1]

    def mean(m, users, seeds):
        return float(np.nanmean(m[np.ix_(seeds, users)]))

    all_users = np.arange(n_users)
    point_m = mean(model, all_users, np.arange(model.shape[0]))
    point_b = mean(baseline, all_users, np.arange(baseline.shape[0]))
    samples = []
    for _ in range(n_boot):
        users = rng.integers(0, n_users, n_users)
        seeds_m = rng.integers(0, model.shape[0], model.shape[0])
        seeds_b = rng.integers(0, baseline.shape[0], baseline.shape[0])
        samples.append(uplift_pct(mean(model, users, seeds_m), mean(baseline, users, seeds_b)))
    arr = np.asarray(samples)
    arr = arr[np.isfinite(arr)]
    low, high = np.quantile(arr, [alpha / 2, 1 - alpha / 2]) if arr.size else (np.nan, np.nan)
    per_seed_m = np.nanmean(model, axis=1)
    return {
        "uplift_pct": uplift_pct(point_m, point_b),
        "ci_low": float(low),
        "ci_high": float(high),
        "value": point_m,
        "baseline_value": point_b,
        "value_sd": float(np.std(per_seed_m, ddof=1)) if len(per_seed_m) > 1 else float("nan"),
        "baseline_sd": float(np.std(np.nanmean(baseline, axis=1), ddof=1)) if baseline.shape[0] > 1 else float("nan"),
        "seeds": model.shape[0],
        "baseline_seeds": baseline.shape[0],
        "users": n_users,
    }


def verdict(ci_low: float, ci_high: float, claimed_positive: bool = True) -> str:
    """One word per claim: the interval decides, never the point estimate alone."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "not resolvable at this data size"
    if claimed_positive:
        if ci_low > 0:
            return "reproduced"
        if ci_high < 0:
            return "not reproduced (reversed)"
    else:
        if ci_high < 0:
            return "reproduced"
        if ci_low > 0:
            return "not reproduced (reversed)"
    return "not resolvable at this data size"


__all__ = ["paired_uplift", "paired_user_mean_uplift", "seed_mean", "verdict"]
