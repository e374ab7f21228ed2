"""Self-attention over heads of width 4 (TRACE: d_model 32, 8 heads), forward and backward, as one
small C kernel built with the system's C compiler on first use and called through ctypes.

Why: PyTorch's CPU attention kernels are made for wide heads. With heads of width 4, its flash
kernel ran the training step's attention (forward + backward, one thread) at ~3.7-4.4 useful
GFLOP/s on this machine, and every formulation in PyTorch ops (the math backend, bmm + softmax,
a hand-written autograd backward, einsum, torch.compile of either) was slower still (1.1-1.8
GFLOP/s: they write [L, L] scores to memory several times); FlexAttention has no CPU backward in
torch 2.13. This kernel (bench/trace_model.py measures both side by side) computes the same
softmax(q k^T / 2) v, with the scores recomputed in the backward pass as flash attention does
(nothing [L, L] is stored), one (sequence, head) at a time, keys and values transposed into a
small buffer so that each loop over keys runs on 16 floats per instruction (AVX-512; 8 on AVX2),
with the exponential inlined as a polynomial.

Same math as ``F.scaled_dot_product_attention``: outputs and gradients agree up to float
rounding (~1e-6; tests/test_attention_kernel.py), and it is deterministic. It runs on one thread,
so it is used only when torch has one (every training step of the pipeline: ``torch_threads``),
and only where autograd needs it (training, ``trace.SelfAttention.attend``): inference and
serving keep PyTorch's kernel. Without
a C compiler, or where the build fails, ``kernel()`` is None and the model runs on PyTorch alone.

Built and cached by ``native.build`` (model_lib/native.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import Tensor

from model_lib import native

HEAD_WIDTH = 4
SCALE = HEAD_WIDTH**-0.5  # what scaled_dot_product_attention uses
_enabled = True  # off inside `pytorch_only()`

SOURCE = r"""
/* Softmax attention over heads of width 4, forward and backward, straight from the packed
   projections: qkv [B, L, 3 * H * 4] (q, k, v side by side, heads in order), out [B, L, H * 4].
   One (sequence, head) at a time; keys and values are transposed into a small buffer so that the
   loops over keys run on whole vectors; scores are recomputed in the backward pass
   (nothing [L, L] is ever stored). keys: [B, L] uint8, 1 = visible (NULL: every slot). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MASKED (-1e30f) /* finite: -ffast-math assumes no infinities */

/* e^x for the softmax's arguments (x <= ~0), inlined into the vector loops (fwd + bwd measured
   1.35x faster than with glibc's vector expf on AVX2, 1.7x on AVX-512): 2^n * 2^f with n the nearest
   integer to x log2(e), f in [-0.5, 0.5], 2^f by its degree-6 Taylor polynomial (relative error
   ~1e-7). Below -87 (a masked key, or a weight under 1e-38) it is exactly 0. */
static inline float exp_nonpositive(float x) {
    const float t = fmaxf(x, -87.0f) * 1.4426950408889634f;
    const float n = floorf(t + 0.5f), f = t - n;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910072e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { float f; int32_t i; } bits = {p};
    bits.i += (int32_t)n << 23; /* times 2^n */
    return x < -87.0f ? 0.0f : bits.f;
}

/* keys and values of head h of sequence b as columns kt[d * Lp + j], vt[d * Lp + j] (keys scaled), bias[j]:
   0 for a visible key, MASKED for a hidden one and for the slots L..Lp-1 that round the loops up to whole
   vectors (their keys and values are 0). */
static void load_head(const float *qkv, const uint8_t *keys, int64_t b, int64_t h, int64_t L, int64_t Lp, int64_t D,
                      float scale, float *kt, float *vt, float *bias) {
    for (int64_t j = L; j < Lp; j++) {
        for (int d = 0; d < 4; d++) kt[d * Lp + j] = vt[d * Lp + j] = 0.0f;
        bias[j] = MASKED;
    }
    for (int64_t j = 0; j < L; j++) {
        const float *row = qkv + (b * L + j) * 3 * D + h * 4;
        for (int d = 0; d < 4; d++) {
            kt[d * Lp + j] = row[D + d] * scale;
            vt[d * Lp + j] = row[2 * D + d];
        }
        bias[j] = (keys && !keys[b * L + j]) ? MASKED : 0.0f;
    }
}

/* out [B, L, D], lse [B, H, L] */
int attn4_forward(const float *qkv, const uint8_t *keys, int64_t B, int64_t H, int64_t L, float scale, float *out,
                  float *lse) {
    const int64_t D = 4 * H, Lp = (L + 7) & ~(int64_t)7;
    float *buf = malloc(sizeof(float) * Lp * 10);
    if (!buf) return 1;
    float *kt = buf, *vt = buf + 4 * Lp, *bias = buf + 8 * Lp, *p = buf + 9 * Lp;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            load_head(qkv, keys, b, h, L, Lp, D, scale, kt, vt, bias);
            const float *restrict k0 = kt, *restrict k1 = kt + Lp, *restrict k2 = kt + 2 * Lp, *restrict k3 = kt + 3 * Lp;
            const float *restrict v0 = vt, *restrict v1 = vt + Lp, *restrict v2 = vt + 2 * Lp, *restrict v3 = vt + 3 * Lp;
            const float *restrict bs = bias;
            float *restrict ps = p;
            for (int64_t i = 0; i < L; i++) {
                const float *q = qkv + (b * L + i) * 3 * D + h * 4;
                const float q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
                float m = MASKED;
#pragma omp simd reduction(max : m)
                for (int64_t j = 0; j < Lp; j++) {
                    float s = bs[j] + q0 * k0[j] + q1 * k1[j] + q2 * k2[j] + q3 * k3[j];
                    ps[j] = s;
                    m = s > m ? s : m;
                }
                float l = 0.f, o0 = 0.f, o1 = 0.f, o2 = 0.f, o3 = 0.f;
#pragma omp simd reduction(+ : l, o0, o1, o2, o3)
                for (int64_t j = 0; j < Lp; j++) {
                    float e = exp_nonpositive(ps[j] - m);
                    l += e;
                    o0 += e * v0[j];
                    o1 += e * v1[j];
                    o2 += e * v2[j];
                    o3 += e * v3[j];
                }
                const float r = 1.0f / l;
                float *o = out + (b * L + i) * D + h * 4;
                o[0] = o0 * r, o[1] = o1 * r, o[2] = o2 * r, o[3] = o3 * r;
                lse[(b * H + h) * L + i] = m + logf(l);
            }
        }
    free(buf);
    return 0;
}

/* dqkv [B, L, 3D] from dout [B, L, D], given the forward's out and lse */
int attn4_backward(const float *qkv, const uint8_t *keys, const float *out, const float *lse, const float *dout,
                   int64_t B, int64_t H, int64_t L, float scale, float *dqkv) {
    const int64_t D = 4 * H, Lp = (L + 7) & ~(int64_t)7;
    float *buf = malloc(sizeof(float) * Lp * 17);
    if (!buf) return 1;
    float *kt = buf, *vt = buf + 4 * Lp, *bias = buf + 8 * Lp, *dkt = buf + 9 * Lp, *dvt = buf + 13 * Lp;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            load_head(qkv, keys, b, h, L, Lp, D, scale, kt, vt, bias);
            memset(dkt, 0, sizeof(float) * 8 * Lp);
            const float *restrict k0 = kt, *restrict k1 = kt + Lp, *restrict k2 = kt + 2 * Lp, *restrict k3 = kt + 3 * Lp;
            const float *restrict v0 = vt, *restrict v1 = vt + Lp, *restrict v2 = vt + 2 * Lp, *restrict v3 = vt + 3 * Lp;
            float *restrict dk0 = dkt, *restrict dk1 = dkt + Lp, *restrict dk2 = dkt + 2 * Lp, *restrict dk3 = dkt + 3 * Lp;
            float *restrict dv0 = dvt, *restrict dv1 = dvt + Lp, *restrict dv2 = dvt + 2 * Lp, *restrict dv3 = dvt + 3 * Lp;
            const float *restrict bs = bias;
            for (int64_t i = 0; i < L; i++) {
                const float *q = qkv + (b * L + i) * 3 * D + h * 4;
                const float *o = out + (b * L + i) * D + h * 4, *g = dout + (b * L + i) * D + h * 4;
                const float q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
                const float g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];
                const float delta = g0 * o[0] + g1 * o[1] + g2 * o[2] + g3 * o[3];
                const float li = lse[(b * H + h) * L + i];
                float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (int64_t j = 0; j < Lp; j++) {
                    const float p = exp_nonpositive(bs[j] + q0 * k0[j] + q1 * k1[j] + q2 * k2[j] + q3 * k3[j] - li);
                    const float ds = p * (g0 * v0[j] + g1 * v1[j] + g2 * v2[j] + g3 * v3[j] - delta);
                    a0 += ds * k0[j], a1 += ds * k1[j], a2 += ds * k2[j], a3 += ds * k3[j];
                    dk0[j] += ds * q0, dk1[j] += ds * q1, dk2[j] += ds * q2, dk3[j] += ds * q3;
                    dv0[j] += p * g0, dv1[j] += p * g1, dv2[j] += p * g2, dv3[j] += p * g3;
                }
                float *dq = dqkv + (b * L + i) * 3 * D + h * 4; /* kt carries the scale already */
                dq[0] = a0, dq[1] = a1, dq[2] = a2, dq[3] = a3;
            }
            for (int64_t j = 0; j < L; j++) {
                float *row = dqkv + (b * L + j) * 3 * D + h * 4;
                for (int d = 0; d < 4; d++) {
                    row[D + d] = dkt[d * Lp + j] * scale;
                    row[2 * D + d] = dvt[d * Lp + j];
                }
            }
        }
    free(buf);
    return 0;
}
"""


@cache
def kernel() -> ctypes.CDLL | None:
    """The built library, or None (no C compiler, a failed build, or ``TRACE_NATIVE_KERNELS=0``)."""
    lib = native.build("attn4", SOURCE)
    if lib is None:
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.attn4_forward.argtypes = [p, p, i64, i64, i64, f32, p, p]
    lib.attn4_backward.argtypes = [p, p, p, p, p, i64, i64, i64, f32, p]
    lib.attn4_forward.restype = lib.attn4_backward.restype = ctypes.c_int
    return lib


def applies(qkv: Tensor, n_heads: int) -> bool:
    """Whether ``attend`` can take projections ``qkv`` [B, L, 3 * n_heads * 4]: float32 on CPU,
    heads of width 4, torch on one thread (the kernel has one; PyTorch's spreads over all), and
    the kernel built."""
    return (
        _enabled
        and torch.get_num_threads() == 1
        and qkv.shape[-1] == 3 * HEAD_WIDTH * n_heads
        and qkv.dtype == torch.float32
        and qkv.device.type == "cpu"
        and kernel() is not None
    )


@contextmanager
def pytorch_only() -> Iterator[None]:
    """Attention on PyTorch's kernel inside the block (benchmarks compare the two side by side)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


class _Attention4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, keys: Tensor | None, n_heads: int) -> Tensor:
        qkv = qkv.contiguous()
        keys = None if keys is None else keys.to(torch.bool).contiguous()
        B, L, _ = qkv.shape
        out = qkv.new_empty(B, L, HEAD_WIDTH * n_heads)
        lse = qkv.new_empty(B, n_heads, L)  # log-sum-exp of each query's scores, for the backward pass
        status = kernel().attn4_forward(
            qkv.data_ptr(),
            None if keys is None else keys.data_ptr(),
            B,
            n_heads,
            L,
            SCALE,
            out.data_ptr(),
            lse.data_ptr(),
        )
        if status:
            raise MemoryError("attention kernel: out of memory")
        ctx.save_for_backward(qkv, out, lse)
        ctx.keys, ctx.n_heads = keys, n_heads
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        qkv, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        B, L, _ = qkv.shape
        dqkv = torch.empty_like(qkv)
        keys = ctx.keys
        status = kernel().attn4_backward(
            qkv.data_ptr(),
            None if keys is None else keys.data_ptr(),
            out.data_ptr(),
            lse.data_ptr(),
            dout.data_ptr(),
            B,
            ctx.n_heads,
            L,
            SCALE,
            dqkv.data_ptr(),
        )
        if status:
            raise MemoryError("attention kernel: out of memory")
        return dqkv, None, None


def attend(qkv: Tensor, keys: Tensor | None, n_heads: int) -> Tensor:
    """Projections [B, L, 3D] (q, k, v side by side, heads of width 4 in order) -> attention
    outputs [B, L, D]; ``keys`` [B, L] bool: the visible slots (None: all). Every query row needs
    at least one visible key (``trace.attention_mask`` sees to it)."""
    return _Attention4.apply(qkv, keys, n_heads)


__all__ = ["HEAD_WIDTH", "applies", "attend", "kernel", "pytorch_only"]
