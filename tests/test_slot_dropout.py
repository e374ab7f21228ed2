"""slot_dropout: the C kernel and the numpy reference draw the same bits; the masks have
dropout's rate, look independent across features, slots and seeds, repeat under a seed, and the
backward pass applies the forward's mask."""

import numpy as np
import pytest
import torch

from model_lib import slot_dropout as sd


def _draw(x, p, slots, seed):
    torch.manual_seed(seed)
    return sd.slot_dropout(x, p, slots)


@pytest.mark.skipif(sd.kernel() is None, reason="no C compiler: the numpy reference is used")
@pytest.mark.parametrize("n_features", [32, 7])
def test_kernel_and_reference_draw_the_same_bits(monkeypatch, n_features):
    x = torch.randn(500, n_features)
    slots = torch.from_numpy(np.random.default_rng(0).choice(2**34, size=500, replace=False))  # past 2^32 too
    got = _draw(x, 0.1, slots, seed=3)
    monkeypatch.setattr(sd, "kernel", lambda: None)
    want = _draw(x, 0.1, slots, seed=3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got == 0).any() and (got != 0).any()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_rate_scale_and_independence(p):
    n, d = 20_000, 32
    mask = sd.keep_mask(np.arange(n), d, seed=12345, p=p)
    kept = mask.mean()
    sigma = np.sqrt(p * (1 - p) / mask.size)
    assert abs(kept - (1 - p)) < 5 * sigma
    m = mask.astype(float)
    bound = 5 / np.sqrt(n)
    assert abs(np.corrcoef(m[:, 0], m[:, 1])[0, 1]) < bound  # neighbouring features
    assert abs(np.corrcoef(m[:-1].ravel(), m[1:].ravel())[0, 1]) < 5 / np.sqrt(m[1:].size)  # neighbouring slots
    other = sd.keep_mask(np.arange(n), d, seed=12346, p=p).astype(float)
    assert abs(np.corrcoef(m.ravel(), other.ravel())[0, 1]) < 5 / np.sqrt(m.size)  # neighbouring seeds
    x = torch.ones(n, d)
    out = _draw(x, p, None, seed=0)
    values = out.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / (1 - p))
    assert abs(out.mean().item() - 1) < 5 * np.sqrt(p / (1 - p) / x.numel())


def test_a_seed_repeats_and_calls_differ():
    x = torch.randn(64, 32)
    first, second = _draw(x, 0.3, None, seed=1), _draw(x, 0.3, None, seed=1)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.manual_seed(1)
    a, b = sd.slot_dropout(x, 0.3), sd.slot_dropout(x, 0.3)
    assert not torch.equal(a, b)  # each call draws its own seed


def test_mask_is_a_function_of_the_slot():
    """An event keeps its mask wherever it sits among the carried rows: what packing relies on."""
    x = torch.randn(10, 32)
    slots = torch.tensor([3, 9, 14, 15, 40, 41, 42, 77, 100, 101])
    full = _draw(torch.randn(128, 32).abs() + 1, 0.2, None, seed=4) != 0  # rows = slots 0..127
    packed = _draw(x.abs() + 1, 0.2, slots, seed=4) != 0
    assert torch.equal(packed, full[slots])


@pytest.mark.parametrize("reference", [False, True])
def test_backward_applies_the_forward_mask(monkeypatch, reference):
    if reference:  # numpy: the mask is kept from the forward pass
        monkeypatch.setattr(sd, "kernel", lambda: None)
    x = torch.randn(300, 32, requires_grad=True)
    slots = torch.arange(0, 600, 2)
    y = _draw(x, 0.25, slots, seed=7)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, torch.where(kept, g / 0.75, torch.zeros_like(g)))


def test_edge_rates():
    x = torch.randn(5, 4)
    assert sd.slot_dropout(x, 0.0) is x
    assert torch.equal(sd.slot_dropout(x, 1.0), torch.zeros_like(x))
