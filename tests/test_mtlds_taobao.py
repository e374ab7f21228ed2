"""Real data: every MTLDS aggregation and every baseline, trained on the Taobao slices, ranks
held-out users' purchases better than a random score."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model_lib.funnel_samples import FUNNELS, build_funnel_samples, samples_to_tensors, split_by_user
from model_lib.metrics import auroc, bootstrap_ci
from model_lib.mtlds import AGGREGATIONS, MTLDSConfig, evaluate, funnel_depth, per_user_ndcg, predict
from model_lib.mtlds_baselines import BASELINES, build_model
from model_lib.training import TrainConfig, fit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "taobao_userbehavior"
FILES = ["userbehavior_head.csv.gz", "userbehavior_tail.csv.gz"]
MODELS = [f"mtlds_{a}" for a in AGGREGATIONS] + list(BASELINES)

pytestmark = pytest.mark.slow


def load_taobao() -> pd.DataFrame:
    """Both slices as canonical events. The head file's last row is truncated (no timestamp):
    rows with a missing field are dropped here, as test data preparation."""
    missing = [f for f in FILES if not (DATA / f).exists()]
    if missing:
        pytest.skip(f"Taobao slices not found under {DATA}: {missing}")
    cols = ["user_id", "item_id", "category", "event_name", "timestamp"]
    raw = pd.concat([pd.read_csv(DATA / f, header=None, names=cols, dtype=str) for f in FILES]).dropna()
    raw["event_time"] = pd.to_datetime(raw.pop("timestamp").astype(np.int64), unit="s", utc=True)
    return raw


@pytest.fixture(scope="module")
def taobao():
    torch.set_num_threads(1)
    spec = replace(FUNNELS["taobao"], item_buckets=2**12, category_buckets=2**10)
    samples = build_funnel_samples(load_taobao(), spec)
    train, valid, test = (samples_to_tensors(x, spec) for x in split_by_user(samples, (0.7, 0.1, 0.2)))
    assert test["labels"][:, 1].sum() >= 50  # enough held-out purchases for the AUC to mean something
    cfg = MTLDSConfig.from_spec(spec, bottom=(64, 32), tower=(16,), embed_dim=8)
    return cfg, train, valid, test


@pytest.fixture(scope="module")
def results(taobao):
    cfg, train, valid, test = taobao
    out = {}
    for name in MODELS:
        model = build_model(name, cfg, seed=0)
        fit(model, train, valid, TrainConfig(epochs=6, batch_size=256, patience=2, seed=0, num_threads=1))
        out[name] = (evaluate(model, test), predict(model, test)[0])
    buy = test["labels"][:, 1].numpy()
    random_scores = np.random.default_rng(0).random(len(buy))
    depth = funnel_depth(test["labels"][:, :2]).numpy()
    print(f"\nheld-out users: {int(test['group'].max()) + 1}, samples: {len(buy)}, purchases: {int(buy.sum())}")
    print(
        f"{'random':15s} auc_buy={auroc(buy, random_scores):.3f} ndcg={per_user_ndcg(test['group'].numpy(), depth, random_scores):.3f}"
    )
    for name, (metrics, _) in out.items():
        aucs = " ".join(f"auc_{t}={v:.3f}" for t, v in metrics["auc"].items())
        print(f"{name:15s} {aucs} ndcg={metrics['ndcg']:.3f}")
    return out, buy


@pytest.mark.parametrize("name", MODELS)
def test_model_beats_a_random_score_on_held_out_purchases(results, name):
    out, buy = results
    metrics, probs = out[name]
    assert np.isfinite(metrics["ndcg"]) and all(np.isfinite(v) for v in metrics["auc"].values())
    # a random score has AUC 0.5 in expectation: the 95% bootstrap interval must lie above it
    low, _ = bootstrap_ci(auroc, buy, probs[:, 1], n_boot=200, seed=0)
    assert low > 0.5, f"{name}: purchase AUC {metrics['auc']['buy']:.3f}, 95% CI low {low:.3f}"
