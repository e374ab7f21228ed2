"""Metrics against sklearn and hand-computed cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, ndcg_score, roc_auc_score

from model_lib.metrics import auprc, auroc, bootstrap_ci, ndcg_at_k, paired_bootstrap_uplift_ci, uplift_pct


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
