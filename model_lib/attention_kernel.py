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
small buffer so that each loop over keys runs on 8 floats per instruction.

Same math as ``F.scaled_dot_product_attention``: outputs and gradients agree up to float
rounding (~1e-6; tests/test_attention_kernel.py), and it is deterministic. It runs on one thread,
so it is used only when torch has one (every training step of the pipeline: ``torch_threads``),
and only where autograd needs it (training, ``trace.SelfAttention.attend``): inference and
serving keep PyTorch's kernel. Without
a C compiler, or where the build fails, ``kernel()`` is None and the model runs on PyTorch alone.

Build: ``-ffast-math`` (vector ``expf`` from glibc's libmvec) at *compile* time only: linking a
shared library with it adds a constructor that sets flush-to-zero for the whole process (GCC < 13).
The library lands in the user's cache (`$XDG_CACHE_HOME` or `~/.cache`, `trace_dagster/kernels`; or
`TRACE_KERNEL_CACHE`), named by a hash of the source and flags (written under a
temporary name, then renamed: concurrent processes never load a half-written file).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

HEAD_WIDTH = 4
SCALE = HEAD_WIDTH**-0.5  # what scaled_dot_product_attention uses
_enabled = True  # off inside `pytorch_only()`

SOURCE = r"""
/* Softmax attention over heads of width 4, forward and backward, straight from the packed
   projections: qkv [B, L, 3 * H * 4] (q, k, v side by side, heads in order), out [B, L, H * 4].
   One (sequence, head) at a time; keys and values are transposed into a small buffer so that the
   loops over keys run on 8 floats per instruction; scores are recomputed in the backward pass
   (nothing [L, L] is ever stored). keys: [B, L] uint8, 1 = visible (NULL: every slot). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MASKED (-1e30f) /* finite: -ffast-math assumes no infinities */

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
                    float e = expf(ps[j] - m);
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
                    const float p = expf(bs[j] + q0 * k0[j] + q1 * k1[j] + q2 * k2[j] + q3 * k3[j] - li);
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


def _flags() -> list[str]:
    arch = ["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
    return ["-O3", "-ffast-math", "-fopenmp-simd", "-fPIC", *arch]


@cache
def kernel() -> ctypes.CDLL | None:
    """The built library, or None (no C compiler, a failed build, or ``TRACE_ATTENTION_KERNEL=0``)."""
    if os.environ.get("TRACE_ATTENTION_KERNEL", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        log.info("no C compiler: attention runs on PyTorch's kernel")
        return None
    flags = _flags()
    digest = hashlib.sha256("\0".join([SOURCE, cc, *flags]).encode()).hexdigest()[:16]
    # the user's own cache, not a shared /tmp where another account could plant a library by that name
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = Path(os.environ.get("TRACE_KERNEL_CACHE") or cache_home / "trace_dagster" / "kernels")
    library = folder / f"attn4-{digest}.so"
    try:
        if not library.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                source, obj, out = Path(tmp) / "attn4.c", Path(tmp) / "attn4.o", Path(tmp) / "attn4.so"
                source.write_text(SOURCE)
                subprocess.run([cc, *flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True)
                subprocess.run([cc, "-shared", "-o", str(out), str(obj), "-lm"], check=True, capture_output=True)
                os.replace(out, library)
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("attention kernel not built (%s): attention runs on PyTorch's kernel", e)
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
