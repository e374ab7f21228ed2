"""MTLDS and its baselines on small synthetic tensors: shapes, losses, factory, evaluation."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from model_lib.metrics import ndcg_at_k
from model_lib.mtlds import MTLDS, FunnelModel, MTLDSConfig, evaluate, funnel_depth, per_user_ndcg
from model_lib.mtlds_baselines import ESMM, MODEL_NAMES, build_model
from model_lib.training import TrainConfig, fit

torch.set_num_threads(1)

CFG = MTLDSConfig(
    funnel_tasks=("cart", "buy"),
    extra_tasks=("fav",),
    user_buckets=50,
    item_buckets=100,
    category_buckets=20,
    dense_features=4,
    id_features=("user", "item", "category"),
    embed_dim=4,
    bottom=(16, 8),
    tower=(8,),
    list_size=8,
)


def make_data(n=64, seed=0, signal=False):
    """Random inputs; with ``signal``, the funnel depth is driven by the first dense feature."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, 4, generator=g)
    if signal:
        u = dense[:, 0] + 0.5 * torch.randn(n, generator=g)
        cart, buy = (u > 0.5).float(), (u > 1.2).float()
        fav = (dense[:, 1] > 1.0).float()
    else:
        cart, buy, fav = (torch.rand(3, n, generator=g) < 0.3).float()
    return {
        "user": torch.randint(1, 50, (n,), generator=g),
        "item": torch.randint(1, 100, (n,), generator=g),
        "category": torch.randint(1, 20, (n,), generator=g),
        "hour": torch.randint(0, 24, (n,), generator=g),
        "weekday": torch.randint(0, 7, (n,), generator=g),
        "dense": dense,
        "labels": torch.stack([cart, buy, fav], dim=1),
        "group": torch.randint(0, 8, (n,), generator=g),
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_predicts_and_trains(name):
    torch.manual_seed(0)
    model = build_model(name, CFG)
    batch = make_data()
    probs = model.task_probs(batch)
    assert probs.shape == (64, 3) and torch.all((probs > 0) & (probs < 1))
    assert model.rank_score(batch).shape == (64,)
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad == []  # every parameter is used by the loss


def test_factory_names_and_aggregations():
    assert build_model("mtlds_mul", CFG).aggregate.kind == "mul"
    assert build_model("mtlds_multiplicative", CFG).aggregate.kind == "mul"
    assert build_model("mtlds", replace(CFG, aggregation="max")).aggregate.kind == "max"
    assert type(build_model("esmm", CFG)) is ESMM
    a, b = build_model("mmoe", CFG, seed=3), build_model("mmoe", CFG, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for bad in ("mtlds_median", "xgboost"):
        with pytest.raises(ValueError):
            build_model(bad, CFG)


def test_mtlds_loss_is_bce_plus_lambda_times_permutation_loss():
    torch.manual_seed(0)
    model = MTLDS(CFG)
    batch = make_data()
    logits = model.task_logits(batch)
    bce = model.bce(logits, batch["labels"])
    perm = model.ranking_loss(torch.sigmoid(logits), batch["labels"])
    assert perm > 0
    torch.testing.assert_close(model.loss(batch), bce + CFG.perm_weight * perm)
    model.cfg = replace(CFG, perm_weight=0.0)
    torch.testing.assert_close(model.loss(batch), bce)


def test_ranking_loss_uses_whole_lists_and_funnel_columns_only():
    torch.manual_seed(0)
    model = MTLDS(CFG)
    batch = make_data(n=20)  # list_size 8: two lists, four samples left out
    probs = model.task_probs(batch)
    full = model.ranking_loss(probs, batch["labels"])
    tail_changed = batch["labels"].clone()
    tail_changed[16:] = 1 - tail_changed[16:]
    fav_changed = batch["labels"].clone()
    fav_changed[:, 2] = 1 - fav_changed[:, 2]
    torch.testing.assert_close(model.ranking_loss(probs, tail_changed), full)
    torch.testing.assert_close(model.ranking_loss(probs, fav_changed), full)
    assert model.ranking_loss(probs[:7], batch["labels"][:7]).item() == 0.0  # no full list


def test_esmm_is_a_chain_of_conditional_probabilities():
    torch.manual_seed(0)
    model = ESMM(CFG)
    batch = make_data()
    cond = torch.sigmoid(model.task_logits(batch))
    probs = model.task_probs(batch)
    torch.testing.assert_close(probs[:, 0], cond[:, 0])  # pCTR analogue: P(cart | view)
    torch.testing.assert_close(probs[:, 1], cond[:, 0] * cond[:, 1])  # pCTCVR = pCTR x pCVR
    torch.testing.assert_close(probs[:, 2], cond[:, 2])  # extra label: its own tower
    assert torch.all(probs[:, 1] <= probs[:, 0])


class Oracle(FunnelModel):
    """Scores each sample by a fixed function of its labels, to check the evaluation plumbing."""

    def __init__(self, cfg, sign):
        super().__init__(cfg)
        self.sign = sign

    def task_logits(self, batch):
        return self.sign * (batch["labels"] * 8 - 4)

    def rank_score(self, batch, probs=None):
        return self.sign * funnel_depth(batch["labels"][:, :2])


def test_evaluate_rewards_the_true_order_and_punishes_the_reverse():
    data = make_data(n=200, seed=1)
    good, bad = evaluate(Oracle(CFG, 1.0), data), evaluate(Oracle(CFG, -1.0), data)
    assert good["auc"] == {"cart": 1.0, "buy": 1.0, "fav": 1.0}
    assert bad["auc"] == {"cart": 0.0, "buy": 0.0, "fav": 0.0}
    assert good["ndcg"] == pytest.approx(1.0)
    assert bad["ndcg"] < 0.7


def test_per_user_ndcg_groups_lists_by_user():
    groups = np.array([0, 1, 0, 1, 0, 2])
    relevance = np.array([2.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.5, 0.3])
    # user 0: items (rel 2, 0, 1) ranked (0.1, 0.8, 0.5) -> order rel 0, 1, 2
    expected_u0 = ndcg_at_k(np.array([[2.0, 0.0, 1.0]]), np.array([[0.1, 0.8, 0.5]]))
    # user 1: items (rel 0, 1) ranked (0.9, 0.2) -> the relevant item second; user 2 has nothing relevant
    expected_u1 = (2**1 - 1) / np.log2(3) / 1.0
    assert per_user_ndcg(groups, relevance, scores) == pytest.approx((expected_u0 + expected_u1) / 2)


def test_mtlds_learns_a_planted_funnel():
    train, valid, test = make_data(2048, 0, True), make_data(512, 1, True), make_data(1024, 2, True)
    model = MTLDS(replace(CFG, id_features=(), list_size=16))
    result = fit(model, train, valid, TrainConfig(epochs=6, batch_size=128, learning_rate=3e-3, num_threads=1))
    assert result.history[-1].train_loss < result.history[0].train_loss
    metrics = evaluate(model, test)
    assert metrics["auc"]["cart"] > 0.85 and metrics["auc"]["buy"] > 0.85
    weights = model.aggregate.weight.detach()
    depth = funnel_depth(test["labels"][:, :2])
    scores = model.rank_score(test).detach()
    assert scores[depth == 2].mean() > scores[depth == 1].mean() > scores[depth == 0].mean()
    assert torch.isfinite(weights).all()
