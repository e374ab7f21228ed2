"""The shared training loop: batching, determinism, best-weights restore, early stopping, resume."""

import math

import pytest
import torch
from torch import nn

from model_lib.training import EpochReport, TrainConfig, evaluate_loss, fit, iterate_batches, set_seed

torch.set_num_threads(1)


class TinyRegressor(nn.Module):
    """Linear model with dropout (so that determinism covers the dropout RNG too)."""

    def __init__(self, d_in: int = 4, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 1))

    def loss(self, batch):
        return nn.functional.mse_loss(self.net(batch["x"]).squeeze(-1), batch["y"])


def make_data(n=200, seed=0, flip=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(n, generator=g)
    return {"x": x, "y": -y if flip else y}


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_iterate_batches_covers_every_row_once():
    data = {"a": torch.arange(10), "b": torch.arange(10) * 2}
    plain = list(iterate_batches(data, 4))
    assert [len(b["a"]) for b in plain] == [4, 4, 2]
    assert torch.equal(torch.cat([b["a"] for b in plain]), torch.arange(10))
    shuffled = list(iterate_batches(data, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    rows = torch.cat([b["a"] for b in shuffled])
    assert sorted(rows.tolist()) == list(range(10)) and not torch.equal(rows, torch.arange(10))
    assert all(torch.equal(b["b"], b["a"] * 2) for b in shuffled)  # rows stay aligned across keys
    again = list(iterate_batches(data, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.cat([b["a"] for b in again]), rows)


def test_iterate_batches_rejects_misaligned_tensors():
    with pytest.raises(ValueError, match="first dimension"):
        list(iterate_batches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2))


def test_fit_learns_and_restores_best_weights():
    set_seed(0)
    model = TinyRegressor()
    train, valid = make_data(seed=0), make_data(seed=1)
    before = evaluate_loss(model, valid, 64)
    reports = []
    result = fit(model, train, valid, TrainConfig(epochs=8, batch_size=32, learning_rate=1e-2), on_epoch=reports.append)
    assert len(reports) == len(result.history) == 8 and all(isinstance(r, EpochReport) for r in reports)
    assert result.best_valid_loss < before / 5
    assert not model.training
    # after fit the model holds the best epoch's weights: its validation loss is the best one
    assert evaluate_loss(model, valid, 64) == pytest.approx(result.best_valid_loss, rel=1e-6)
    assert result.history[result.best_epoch - 1].is_best
    assert all(r.samples_per_second > 0 and r.seconds > 0 for r in result.history)


def test_two_fits_with_same_seed_give_identical_weights():
    cfg = TrainConfig(epochs=3, batch_size=16, seed=7, num_threads=1)
    runs = []
    for _ in range(2):
        set_seed(123)  # same initial weights
        model = TinyRegressor()
        fit(model, make_data(seed=0), make_data(seed=1), cfg)
        runs.append(weights(model))
    assert_same_weights(*runs)
    set_seed(123)
    other = TinyRegressor()
    fit(other, make_data(seed=0), make_data(seed=1), TrainConfig(epochs=3, batch_size=16, seed=8, num_threads=1))
    assert not torch.equal(weights(other)["net.0.weight"], runs[0]["net.0.weight"])


def test_early_stopping_stops_after_patience_and_keeps_best_epoch():
    # validation targets are the negated training targets: validation loss rises once training bites
    set_seed(0)
    model = TinyRegressor(dropout=0.0)
    per_epoch = {}
    result = fit(
        model,
        make_data(seed=0),
        make_data(seed=0, flip=True),
        TrainConfig(epochs=50, batch_size=32, learning_rate=1e-2, patience=2),
        on_epoch=lambda r: per_epoch.__setitem__(r.epoch, weights(model)),
    )
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2 < 50
    valid = [r.valid_loss for r in result.history]
    assert result.best_valid_loss == min(valid)
    assert_same_weights(weights(model), per_epoch[result.best_epoch])


def test_min_delta_counts_small_improvements_as_none():
    set_seed(0)
    model = TinyRegressor(dropout=0.0)
    result = fit(
        model, make_data(seed=0), make_data(seed=1), TrainConfig(epochs=10, batch_size=32, min_delta=1e9, patience=2)
    )
    assert result.best_epoch == 1 and result.stopped_early and len(result.history) == 3


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    train, valid = make_data(seed=0), make_data(seed=1)
    cfg = TrainConfig(epochs=5, batch_size=32, patience=10, seed=3, num_threads=1)

    set_seed(11)
    straight = TinyRegressor()
    straight_result = fit(straight, train, valid, cfg)

    ckpt = tmp_path / "ckpt" / "model.pt"
    set_seed(11)
    first = TinyRegressor()
    fit(first, train, valid, TrainConfig(**{**cfg.__dict__, "epochs": 2}), checkpoint_path=ckpt)
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=True)  # plain tensors/dicts only
    assert state["epoch"] == 2 and len(state["history"]) == 2

    set_seed(999)  # a fresh process would start from other weights: the checkpoint must win
    resumed = TinyRegressor()
    seen = []
    resumed_result = fit(resumed, train, valid, cfg, on_epoch=lambda r: seen.append(r.epoch), checkpoint_path=ckpt)
    assert seen == [3, 4, 5]
    assert [r.epoch for r in resumed_result.history] == [1, 2, 3, 4, 5]
    assert resumed_result.best_epoch == straight_result.best_epoch
    assert_same_weights(weights(resumed), weights(straight))

    # a finished run resumes to the same result without training further
    set_seed(5)
    again = TinyRegressor()
    again_result = fit(again, train, valid, cfg, on_epoch=lambda r: seen.append(r.epoch), checkpoint_path=ckpt)
    assert seen == [3, 4, 5] and len(again_result.history) == 5
    assert_same_weights(weights(again), weights(straight))


def test_non_finite_loss_is_an_error():
    class Broken(TinyRegressor):
        def loss(self, batch):
            return super().loss(batch) * math.nan

    with pytest.raises(FloatingPointError, match="non-finite"):
        fit(Broken(), make_data(), make_data(seed=1), TrainConfig(epochs=1))
