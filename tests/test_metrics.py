"""Metrics against sklearn and hand-computed cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, ndcg_score, roc_auc_score

from model_lib.metrics import (
    SeedSummary,
    auprc,
    auroc,
    bootstrap_ci,
    ndcg_at_k,
    paired_bootstrap_uplift_ci,
    seeds_uplift_ci,
    summarize_seeds,
    uplift_pct,
)


def test_auroc_and_auprc_match_sklearn_and_hand_cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y * 0.5 + rng.normal(size=300)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert auprc(y, s) == pytest.approx(average_precision_score(y, s))
    # hand case: 3 of the 4 (pos, neg) pairs are ordered correctly
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert auprc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)


def test_undefined_cases_are_nan_and_missing_labels_are_dropped():
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auprc([0, 0], [0.1, 0.2]))
    assert math.isnan(auroc([], []))
    assert auroc([0, np.nan, 1], [0.1, 5.0, 0.9]) == 1.0
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1])


def test_uplift_pct():
    assert uplift_pct(0.75, 0.70) == pytest.approx(100 * 0.05 / 0.70)
    assert uplift_pct(0.5, 0.5) == 0.0
    assert math.isnan(uplift_pct(0.5, 0.0))


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(1)

    def sample(n):
        y = rng.integers(0, 2, n)
        return y, y + rng.normal(scale=1.5, size=n)

    y, s = sample(400)
    low, high = bootstrap_ci(auroc, y, s, n_boot=300, seed=0)
    assert low < auroc(y, s) < high
    assert (low, high) == bootstrap_ci(auroc, y, s, n_boot=300, seed=0)  # seeded
    y_big, s_big = sample(4000)
    low_big, high_big = bootstrap_ci(auroc, y_big, s_big, n_boot=300, seed=0)
    assert high_big - low_big < (high - low) / 2


def test_paired_bootstrap_uplift():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 1000)
    noise = rng.normal(size=1000)
    strong, weak = y + noise, y + noise + rng.normal(scale=2.0, size=1000)
    point, low, high = paired_bootstrap_uplift_ci(auroc, y, strong, weak, n_boot=300)
    assert point == pytest.approx(uplift_pct(auroc(y, strong), auroc(y, weak)))
    assert 0 < low < point < high
    # identical scores: every paired replicate has uplift exactly 0
    assert paired_bootstrap_uplift_ci(auroc, y, strong, strong, n_boot=50) == (0.0, 0.0, 0.0)


def test_ndcg_hand_case_exponential_gain_and_k():
    rel = np.array([[3, 2, 0, 1]])
    scores = np.array([[0.1, 0.9, 0.5, 0.3]])  # ranking: items 1, 2, 3, 0 -> rel 2, 0, 1, 3
    d = 1 / np.log2(np.arange(2, 6))
    dcg = (2**2 - 1) * d[0] + 0 * d[1] + (2**1 - 1) * d[2] + (2**3 - 1) * d[3]
    idcg = (2**3 - 1) * d[0] + (2**2 - 1) * d[1] + (2**1 - 1) * d[2]
    assert ndcg_at_k(rel, scores) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(rel, scores, k=2) == pytest.approx(((2**2 - 1) * d[0]) / ((2**3 - 1) * d[0] + (2**2 - 1) * d[1]))
    assert ndcg_at_k(rel, np.array([[4.0, 3.0, 1.0, 2.0]])) == pytest.approx(1.0)


def test_ndcg_matches_sklearn_on_binary_relevance_without_ties():
    rng = np.random.default_rng(3)
    rel = rng.integers(0, 2, (50, 6))
    rel[:, 0] = 1  # no all-zero lists: sklearn scores them 0, we exclude them
    scores = rng.normal(size=(50, 6))
    for k in (None, 3):
        assert ndcg_at_k(rel, scores, k) == pytest.approx(ndcg_score(rel, scores, k=k))


def test_ndcg_ties_are_broken_by_position_and_empty_lists_excluded():
    rel = np.array([[0, 1], [1, 0], [0, 0]])
    tied = np.zeros((3, 2))
    # list 0: relevant item second -> 1/log2(3); list 1: relevant item first -> 1; list 2 excluded
    assert ndcg_at_k(rel, tied) == pytest.approx((1 / np.log2(3) + 1.0) / 2)
    assert math.isnan(ndcg_at_k(np.zeros((2, 3)), np.ones((2, 3))))


def _users_at_several_cutoffs(rng, n_users=150, n_cutoffs=3):
    """Each user's rows share most of their label propensity and score: rows are correlated
    within a user, as examples of one user at several rolling cutoffs are."""
    trait = rng.normal(size=n_users)
    users = np.repeat(np.arange(n_users), n_cutoffs)
    y = (trait[users] + 0.3 * rng.normal(size=users.size) > 0).astype(float)
    score = 0.5 * trait[users] + rng.normal(size=n_users)[users] + 0.1 * rng.normal(size=users.size)
    return y, score, users


def test_user_bootstrap_is_calibrated_where_row_resampling_is_overconfident():
    rng = np.random.default_rng(7)
    truth = np.mean([auroc(*_users_at_several_cutoffs(rng, n_users=5000)[:2]) for _ in range(3)])
    covered_rows = covered_users = 0
    width_rows, width_users = [], []
    n_sims = 60  # measured at this seed: users cover 0.93, rows 0.77; widths x1.54
    for sim in range(n_sims):
        y, s, users = _users_at_several_cutoffs(rng)
        low_r, high_r = bootstrap_ci(auroc, y, s, n_boot=100, seed=sim)
        low_u, high_u = bootstrap_ci(auroc, y, s, n_boot=100, seed=sim, groups=users)
        covered_rows += low_r <= truth <= high_r
        covered_users += low_u <= truth <= high_u
        width_rows.append(high_r - low_r)
        width_users.append(high_u - low_u)
    # three nearly duplicated rows per user: the row bootstrap is ~sqrt(3) too narrow
    assert np.mean(width_users) > 1.35 * np.mean(width_rows)
    assert covered_users / n_sims >= 0.88, covered_users / n_sims
    assert covered_rows / n_sims <= 0.85, covered_rows / n_sims


def test_paired_user_bootstrap_uses_the_same_users_for_both_models():
    rng = np.random.default_rng(3)
    y, s, users = _users_at_several_cutoffs(rng, n_users=300)
    # identical models: every replicate has uplift exactly 0 only if both see the same rows
    assert paired_bootstrap_uplift_ci(auroc, y, s, s, n_boot=50, groups=users) == (0.0, 0.0, 0.0)
    worse = s + rng.normal(scale=2.0, size=s.size)
    point, low, high = paired_bootstrap_uplift_ci(auroc, y, s, worse, n_boot=200, groups=users)
    _, low_rows, high_rows = paired_bootstrap_uplift_ci(auroc, y, s, worse, n_boot=200)
    assert 0 < low < point < high
    assert high - low > high_rows - low_rows
    with pytest.raises(ValueError):
        bootstrap_ci(auroc, y, s, groups=users[:-1])


def test_seed_summary_and_uplift_across_seeds_and_users():
    assert summarize_seeds([0.70, 0.72, 0.74]) == SeedSummary(pytest.approx(0.72), pytest.approx(0.02), 3)
    assert math.isnan(summarize_seeds([0.7]).sd)
    rng = np.random.default_rng(4)
    y, s, users = _users_at_several_cutoffs(rng, n_users=300)
    base = [s + rng.normal(scale=2.0, size=s.size) for _ in range(3)]
    stable = [s + rng.normal(scale=0.05, size=s.size) for _ in range(3)]
    # a model whose seeds disagree a lot: its interval must be wider than a stable model's
    unstable = [s + rng.normal(scale=sc, size=s.size) for sc in (0.05, 1.0, 2.0)]
    p_stable, lo_stable, hi_stable = seeds_uplift_ci(auroc, y, stable, base, groups=users, n_boot=200)
    _, lo_unst, hi_unst = seeds_uplift_ci(auroc, y, unstable, base, groups=users, n_boot=200)
    assert lo_stable < p_stable < hi_stable and lo_stable > 0
    assert hi_unst - lo_unst > hi_stable - lo_stable
    # one seed each: the paired user bootstrap
    one = seeds_uplift_ci(auroc, y, [s], [base[0]], groups=users, n_boot=100)
    assert one[0] == pytest.approx(paired_bootstrap_uplift_ci(auroc, y, s, base[0], n_boot=100, groups=users)[0])


def test_sorted_scores_under_weights_equal_the_metrics_of_repeated_rows():
    """The evaluation's bootstrap scores a replicate as row weights on scores sorted once: it must
    give what the metrics give on the rows repeated (ties, NaN labels, empty classes included)."""
    from model_lib.metrics import GroupResampler, SortedScores

    rng = np.random.default_rng(7)
    n = 600
    y = (rng.random(n) < 0.2).astype(float)
    y[rng.random(n) < 0.1] = np.nan  # missing labels are dropped by both
    score = np.round(rng.random(n) + 0.5 * np.nan_to_num(y), 1)  # coarse: many ties
    groups = rng.integers(0, 150, n)
    ranked = SortedScores(y, score)
    assert ranked.auroc() == pytest.approx(auroc(y, score), abs=1e-12)
    assert ranked.auprc() == pytest.approx(auprc(y, score), abs=1e-12)
    resampler = GroupResampler(groups, n)
    for idx, w in zip(resampler.replicates(25, 3), resampler.row_weights(25, 3), strict=True):
        assert np.array_equal(np.bincount(idx, minlength=n), w)
        assert ranked.auroc(w) == pytest.approx(auroc(y[idx], score[idx]), abs=1e-12)
        assert ranked.auprc(w) == pytest.approx(auprc(y[idx], score[idx]), abs=1e-12)
    only_negatives = np.zeros(n)
    only_negatives[:300] = 1.0
    assert np.isnan(SortedScores(y * 0, score).auroc()) and np.isnan(SortedScores(y * 0, score).auprc())
    assert np.isnan(SortedScores(y, score).auroc(only_negatives * (y == 0)))  # a replicate with one class


def test_seeds_uplift_ci_is_the_same_with_sorted_scores_as_with_row_copies():
    """The fast path (AUROC/AUPRC scored as weights) must give the interval of the plain one."""
    from model_lib.metrics import seeds_uplift_ci

    rng = np.random.default_rng(11)
    n = 400
    y = (rng.random(n) < 0.3).astype(float)
    groups = rng.integers(0, 120, n)
    model = [np.round(0.4 * y + rng.random(n), 2) for _ in range(3)]
    base = [np.round(0.2 * y + rng.random(n), 2) for _ in range(3)]
    for fn in (auroc, auprc):
        fast = seeds_uplift_ci(fn, y, model, base, groups, n_boot=60, seed=4)
        plain = seeds_uplift_ci(lambda a, b, fn=fn: fn(a, b), y, model, base, groups, n_boot=60, seed=4)
        assert fast == pytest.approx(plain, abs=1e-9)
