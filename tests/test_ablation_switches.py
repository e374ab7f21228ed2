"""The ablation switches of TRACEConfig and MTLDSConfig change what they claim, and nothing else."""

import dataclasses

import pytest
import torch

from model_lib.mtlds import MTLDS, Aggregation, MTLDSConfig
from model_lib.trace import TRACE, TRACEConfig


def _batch(n=6, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, 7:] = False
    return {
        "cat_ids": torch.randint(2, 16, (n, length, 1), generator=g, dtype=torch.int32),
        "time_features": torch.randn(n, length, 7, generator=g),
        "event_pos": torch.arange(length).flip(0).repeat(n, 1).int(),
        "session_pos": (torch.arange(length).flip(0) // 3).repeat(n, 1).int(),
        "mask": mask,
    }


def _out(config, batch, seed=0):
    torch.manual_seed(seed)
    model = TRACE(config).eval()
    with torch.no_grad():
        return model(batch)


def _permuted(batch, key):
    out = dict(batch)
    out[key] = batch[key].flip(1)  # a different position for every event
    return out


def test_defaults_are_the_papers_model():
    c = TRACEConfig()
    assert (c.use_event_positions, c.use_session_positions, c.position_encoding) == (True, True, "learned")
    assert (c.n_layers, c.n_heads, c.d_model) == (1, 8, 32)
    m = MTLDSConfig()
    assert (m.perm_weight, m.nonnegative_weights, m.relevance, m.task_bce) == (1.0, False, "funnel_depth", True)


@pytest.mark.parametrize(
    ("switches", "key", "invariant"),
    [
        ({}, "event_pos", False),
        ({}, "session_pos", False),
        ({"use_event_positions": False}, "event_pos", True),
        ({"use_event_positions": False}, "session_pos", False),
        ({"use_session_positions": False}, "session_pos", True),
        ({"use_session_positions": False}, "event_pos", False),
        ({"use_event_positions": False, "use_session_positions": False}, "event_pos", True),
        ({"use_event_positions": False, "use_session_positions": False}, "session_pos", True),
        ({"position_encoding": "sinusoidal"}, "event_pos", False),
    ],
)
def test_position_switches(switches, key, invariant):
    config = TRACEConfig(vocab_sizes=(16,), max_len=16, max_sessions=8, **switches)
    batch = _batch()
    same = torch.allclose(_out(config, batch), _out(config, _permuted(batch, key)), atol=1e-6)
    assert same == invariant


def test_sinusoidal_positions_have_no_parameters():
    learned = TRACE(TRACEConfig(vocab_sizes=(16,), max_len=16, max_sessions=8))
    fixed = TRACE(TRACEConfig(vocab_sizes=(16,), max_len=16, max_sessions=8, position_encoding="sinusoidal"))
    n = sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in fixed.parameters())
    assert n == (16 + 8) * 32
    assert "embedding.event_pos.table" not in fixed.state_dict()  # a function of the shape, not saved
    with pytest.raises(ValueError, match="position_encoding"):
        TRACE(TRACEConfig(position_encoding="rotary"))


def test_depth_switch_adds_a_block():
    assert len(TRACE(TRACEConfig(n_layers=2)).blocks) == 2


def _funnel_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = MTLDSConfig(funnel_tasks=("cart", "buy"), extra_tasks=("fav",), dense_features=3, list_size=8)
    batch = {
        "item": torch.randint(0, cfg.item_buckets, (n,), generator=g),
        "category": torch.randint(0, cfg.category_buckets, (n,), generator=g),
        "hour": torch.randint(0, 24, (n,), generator=g),
        "weekday": torch.randint(0, 7, (n,), generator=g),
        "dense": torch.randn(n, 3, generator=g),
        "labels": (torch.rand(n, 3, generator=g) < 0.3).float(),
    }
    return cfg, batch


def test_nonnegative_weights_stay_nonnegative_and_start_at_one():
    agg = Aggregation("linear", 3, nonnegative=True)
    assert torch.allclose(agg.weights, torch.ones(3), atol=1e-6)
    with torch.no_grad():
        agg.weight.fill_(-50.0)
    assert (agg.weights >= 0).all()
    free = Aggregation("linear", 3)
    with torch.no_grad():
        free.weight.fill_(-50.0)
    assert (free.weights < 0).all()


def test_relevance_from_label_aggregation_differs_from_depth():
    cfg, _ = _funnel_batch()
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    depth = MTLDS(cfg).relevance(labels)
    assert depth.tolist() == [1.0, 2.0, 2.0, 0.0]
    # mul of the label vector: only the full sequence counts (the paper's "fail to distinguish")
    mul = MTLDS(dataclasses.replace(cfg, aggregation="mul", relevance="label_aggregation")).relevance(labels)
    assert mul.tolist() == [0.0, 0.0, 1.0, 0.0]


def test_permutation_loss_only_ignores_labels_outside_the_order():
    cfg, batch = _funnel_batch()
    flipped = {**batch, "labels": batch["labels"].clone()}
    flipped["labels"][:, 2] = 1 - flipped["labels"][:, 2]  # fav: BCE only, not in the order
    for task_bce, changes in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = MTLDS(dataclasses.replace(cfg, task_bce=task_bce)).eval()
        a, b = model.loss(batch), model.loss(flipped)
        assert (not torch.isclose(a, b)) == changes
    with pytest.raises(ValueError, match="task_bce"):
        MTLDSConfig(task_bce=False, perm_weight=0.0)


def test_lambda_zero_is_plain_bce():
    cfg, batch = _funnel_batch()
    torch.manual_seed(0)
    model = MTLDS(dataclasses.replace(cfg, perm_weight=0.0)).eval()
    assert torch.isclose(model.loss(batch), model.bce(model.task_logits(batch), batch["labels"]))


def test_every_funnel_ablation_variant_runs_end_to_end(tmp_path):
    """`run_funnel` on each MTLDS switch (one epoch, a small simulated dataset): the operator
    variants (mul, max, sum) have no linear weights to report and must not crash the job."""
    from assets.reproduction.assets import FUNNEL_ABLATIONS
    from assets.reproduction.datasets import build_dataset
    from assets.reproduction.experiments import funnel_samples, run_funnel
    from model_lib.training import TrainConfig

    ds = build_dataset("simulator", tmp_path, n_users=150)
    samples = funnel_samples(ds)
    for variant in FUNNEL_ABLATIONS:
        rows, ndcg, info = run_funnel(ds, samples, variant, 0, TrainConfig(epochs=1, num_threads=1))
        assert len(rows) and len(ndcg), variant.name
        assert ("aggregation_weights" in info) == (variant.kind == "mtlds_linear"), (variant.name, info)
