"""Packed events (model_lib/packing.py) compute what the padded batch computes: same outputs, same
loss and gradients (dropout included) for a seed, up to float rounding, for every sequence model."""

import copy

import pytest
import torch

from model_lib.packing import Packing
from model_lib.trace import attention_mask
from model_lib.trace_baselines import MODEL_KINDS, build_model, get_kind

torch.set_num_threads(1)
B, L, C = 48, 40, 3


def ragged_batch(seed=0):
    """Left-aligned histories of every length from none to full, garbage in the padded slots."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[:3], lengths[3], lengths[4] = L, 0, 1
    mask = torch.arange(L) < lengths[:, None]  # [B, L]
    return {
        "cat_ids": torch.randint(2, 12, (B, L, C), dtype=torch.int32, generator=g),
        "time_features": torch.randn(B, L, 7, generator=g),
        "event_pos": (lengths[:, None] - 1 - torch.arange(L)).clamp(min=0).int(),
        "session_pos": torch.randint(0, 6, (B, L), dtype=torch.int32, generator=g),
        "mask": mask,
        "labels": torch.randint(0, 2, (B, 5), generator=g).float(),
    }


def outputs(model, batch, packed):
    """(eval logits, train loss, train gradients) with dropout drawn from seed 5."""
    model = copy.deepcopy(model)
    model.packed_events = packed
    with torch.no_grad():
        logits = model.eval()(batch)
    torch.manual_seed(5)
    loss = model.train().loss(batch)
    loss.backward()
    return logits, loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_packed_events_match_the_padded_computation(kind):
    torch.manual_seed(0)
    model = build_model(kind, get_kind(kind).config_class(vocab_sizes=(12, 12, 12), n_tasks=5, max_len=L))
    batch = ragged_batch()
    padded, packed = outputs(model, batch, packed=False), outputs(model, batch, packed=True)
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-6, atol=1e-6)  # same dropout masks
    for got, want in zip(packed[2], padded[2]):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_groups_hold_every_event_once_and_nothing_else():
    mask = attention_mask(ragged_batch()["mask"])  # an empty history shows one slot, as the models see it
    packing = Packing.of(mask)
    n = int(mask.sum())
    events = torch.arange(1, n + 1, dtype=torch.float32)[:, None]  # [N, 1]
    groups = packing.to_groups(events)
    assert len(groups) > 1 and sum(g.shape[0] for g in groups) == B
    assert [length for _, length in packing.sizes] == sorted((length for _, length in packing.sizes), reverse=True)
    for g, keys, (rows, length) in zip(groups, packing.keys, packing.sizes):
        assert g.shape == (rows, length, 1)
        real = g[..., 0] > 0  # the filler is 0
        assert torch.equal(real, torch.ones_like(real) if keys is None else keys)
        assert real[:, -1].any() and real[:, 0].all()  # padded to its longest row; no empty row
    assert torch.equal(packing.from_groups(groups), events)
    assert sorted(torch.cat([g[g > 0] for g in groups]).tolist()) == events[:, 0].tolist()
    torch.testing.assert_close(
        packing.pack(torch.where(mask[..., None], 1.0, 0.0)).sum(), torch.tensor(float(n))
    )  # pack keeps the real events only


def test_full_batches_and_the_reference_carry_every_slot():
    full = torch.ones(4, 6, dtype=torch.bool)
    assert Packing.of(full).index is None and Packing.of(full).keys == [None]
    ragged = full.clone()
    ragged[1, 3:] = False
    reference = Packing.of(ragged, packed=False)
    assert reference.index is None and torch.equal(reference.keys[0], ragged)


def without_padding(rows: int, seed=1):
    """Histories that fill all L slots (a served user's sequence once trimmed to its events)."""
    batch = ragged_batch(seed)
    full = {k: v[:rows].clone() for k, v in batch.items()}
    full["mask"] = torch.ones(rows, L, dtype=torch.bool)
    full["event_pos"] = (L - 1 - torch.arange(L, dtype=torch.int32)).expand(rows, L).contiguous()
    return full


def with_empty_slots(batch, extra: int):
    """The same histories in a batch of L + extra slots, the extra ones padding (PAD ids, zeros)."""
    out = {}
    for k, v in batch.items():
        if k == "labels":
            out[k] = v
        else:
            out[k] = torch.cat([v, torch.zeros(v.shape[0], extra, *v.shape[2:], dtype=v.dtype)], dim=1)
    return out


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize(
    "kind, overrides",
    [(k, {}) for k in sorted(MODEL_KINDS)]
    + [
        ("trace", {"position_encoding": "sinusoidal"}),
        ("trace", {"use_event_positions": False}),
        ("trace", {"use_session_positions": False, "n_layers": 2}),
    ],
)
def test_inference_without_padding_matches_the_padded_computation(kind, overrides, rows, monkeypatch):
    """Inference on a batch without padding takes the lean route (TRACE: `_infer_unpadded`, no
    packing and no attention mask; every EventEmbedding: one lookup in the stacked tables): the
    numbers of the padded reference, of the same histories among padding slots (the packed
    route), and of autograd mode (one lookup per table)."""
    from model_lib.trace import TRACE

    torch.manual_seed(0)
    config = get_kind(kind).config_class(vocab_sizes=(12, 12, 12), n_tasks=5, max_len=L + 3, **overrides)
    model = build_model(kind, config).eval()
    reference = copy.deepcopy(model)
    reference.packed_events = False
    batch = without_padding(rows)
    lean_calls = []
    if isinstance(model, TRACE):
        lean = TRACE._infer_unpadded
        monkeypatch.setattr(TRACE, "_infer_unpadded", lambda self, b: lean_calls.append(1) or lean(self, b))
    with torch.no_grad():
        got = model(batch)
        assert len(lean_calls) == isinstance(model, TRACE)  # the lean route was taken where there is one
        padded = reference(batch)
        among_padding = model(with_empty_slots(batch, 3))
    assert len(lean_calls) == isinstance(model, TRACE)  # ... and only there: padding takes the packed route
    with torch.enable_grad():
        autograd = model(batch).detach()
    for want in (padded, among_padding, autograd):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "key, index, value", [("cat_ids", (0, 2, 1), 12), ("cat_ids", (0, 0, 0), -1), ("session_pos", (0, 4), 32)]
)
def test_the_stacked_lookup_rejects_an_id_outside_its_table(key, index, value):
    """One lookup in the tables stacked end to end must not read a neighbouring table's row for an
    id too large for its own: it raises, as the per-table lookups do."""
    torch.manual_seed(0)
    model = build_model("trace", get_kind("trace").config_class(vocab_sizes=(12, 12, 12), max_len=L)).eval()
    batch = without_padding(1)
    batch[key][index] = value
    with torch.no_grad(), pytest.raises(IndexError):
        model(batch)
    with pytest.raises(IndexError):
        model(batch)  # autograd mode: nn.Embedding's own check


def test_the_stacked_table_follows_every_change_of_the_weights():
    """The inference lookup stacks the tables (and folds the time bias in): an optimiser step
    (fused AdamW too, which bumps no version counter), a loaded state dict or an in-place edit of
    one table must show in the next answer."""
    torch.manual_seed(0)
    model = build_model("trace", get_kind("trace").config_class(vocab_sizes=(12, 12, 12), max_len=L)).eval()
    batch = without_padding(2)

    def both():
        with torch.no_grad():
            lean = model(batch)
        return lean, model(batch).detach()  # autograd mode: one lookup per table, no cache

    first = both()
    torch.testing.assert_close(*first, rtol=0, atol=1e-5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.loss({**batch, "labels": torch.ones(2, 5)}).backward()
    optimizer.step()
    with torch.no_grad():
        model.embedding.categorical[2].weight[5] += torch.randn(32)  # (a constant shift: LayerNorm removes it)
        model.embedding.session_pos.weight.mul_(2.0)
    stepped = both()
    torch.testing.assert_close(*stepped, rtol=0, atol=1e-5)
    assert not torch.allclose(stepped[0], first[0])
    fused = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)  # what model_lib.training uses
    model.loss({**batch, "labels": torch.ones(2, 5)}).backward()
    fused.step()
    after_fused = both()
    torch.testing.assert_close(*after_fused, rtol=1e-5, atol=1e-5)  # larger weights: relative rounding
    assert not torch.allclose(after_fused[0], stepped[0])
    fresh = build_model("trace", get_kind("trace").config_class(vocab_sizes=(12, 12, 12), max_len=L)).eval()
    model.load_state_dict(fresh.state_dict())
    loaded = both()
    torch.testing.assert_close(*loaded, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(loaded[0], fresh(batch), rtol=0, atol=0)


def test_a_network_built_in_inference_mode_is_looked_up_uncached():
    with torch.inference_mode():  # its tensors have no version counter: nothing is cached from them
        torch.manual_seed(0)
        model = build_model("trace", get_kind("trace").config_class(vocab_sizes=(12, 12, 12), max_len=L)).eval()
        batch = without_padding(1)
        lean = model(batch)
        with torch.no_grad():
            model.embedding.categorical[0].weight.add_(torch.randn(12, 32))
        assert not torch.allclose(model(batch), lean)
    reference = copy.deepcopy(model)
    reference.packed_events = False
    with torch.no_grad():
        torch.testing.assert_close(model(batch), reference(batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_a_network_frozen_for_serving_answers_the_same_and_cannot_go_stale(kind):
    """`freeze` (what the registered model does on load) keeps one stacked table: the answers are
    those of the unfrozen network, nothing can train it while frozen, and a loaded state dict or
    `train()` drops the table, so the next answer follows the new weights."""
    torch.manual_seed(0)
    config = get_kind(kind).config_class(vocab_sizes=(12, 12, 12), max_len=L)
    model = build_model(kind, config).eval()
    batch = ragged_batch(1)
    with torch.no_grad():
        before = model(batch)
        model.freeze()
        torch.testing.assert_close(model(batch), before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters())
    fresh = build_model(kind, config).eval()
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(batch), fresh(batch), rtol=0, atol=0)
        model.freeze()
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model.loss(batch).backward()
    optimizer.step()
    with torch.no_grad():
        after = model.eval()(batch)
    reference = model(batch).detach()  # autograd mode: one lookup per table, nothing kept
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)
