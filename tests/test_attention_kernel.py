"""The C attention kernel for heads of width 4 (model_lib/attention_kernel.py) computes what
``F.scaled_dot_product_attention`` computes: outputs and gradients, with and without key masks,
at lengths that do and do not fill whole vectors."""

import pytest
import torch
import torch.nn.functional as F

from model_lib import attention_kernel

H = 8
pytestmark = pytest.mark.skipif(attention_kernel.kernel() is None, reason="no C compiler: PyTorch's kernel is used")


def reference(qkv, keys):
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, H, 4).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if keys is None else keys[:, None, None, :])
    return y.transpose(1, 2).reshape(B, L, -1)


@pytest.mark.parametrize("L", [1, 5, 8, 13, 64, 128])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_pytorch_attention_forward_and_backward(L, masked):
    g = torch.Generator().manual_seed(L)
    B = 6
    qkv = (3 * torch.randn(B, L, 3 * 4 * H, generator=g)).requires_grad_(True)
    keys = None
    if masked:
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        keys = torch.arange(L) < lengths[:, None]
        keys[0, L // 2 :] = False  # not only prefixes: any visible set
        keys[0, 0] = True
    grad = torch.randn(B, L, 4 * H, generator=g)
    got = attention_kernel.attend(qkv, keys, H)
    (dgot,) = torch.autograd.grad(got, qkv, grad)
    want = reference(qkv, keys)
    (dwant,) = torch.autograd.grad(want, qkv, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dgot, dwant, rtol=1e-4, atol=5e-5)  # scores up to ~30: rounding


def test_kernel_is_deterministic():
    qkv = torch.randn(4, 37, 3 * 4 * H, requires_grad=True)
    keys = torch.arange(37) < torch.tensor([37, 20, 1, 9])[:, None]
    runs = [torch.autograd.grad(attention_kernel.attend(qkv, keys, H).square().sum(), qkv)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_training_uses_the_kernel_and_inference_does_not(monkeypatch):
    from model_lib.packing import Packing
    from model_lib.trace import SelfAttention

    calls = []
    real = attention_kernel.attend
    monkeypatch.setattr(attention_kernel, "attend", lambda *a: calls.append(1) or real(*a))
    attn = SelfAttention(32, 8)
    x = torch.randn(10, 32)
    packing = Packing.of(torch.ones(2, 5, dtype=torch.bool))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel runs where torch has one thread (every pipeline training step)
    try:
        with torch.no_grad():
            inferred = attn(x, packing)
        assert calls == []
        trained = attn(x, packing)
        assert calls == [1]
        torch.set_num_threads(2)
        attn(x, packing)
        assert calls == [1]  # more threads: PyTorch's kernel, which uses them
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(trained.detach(), inferred, rtol=1e-5, atol=1e-6)
