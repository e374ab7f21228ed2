"""Dropout whose mask is a hash of (seed, padded slot, feature): counter-based, like the Philox
dropout of GPU frameworks, instead of a stream of random draws.

Why: the sequence models run their per-event layers on the carried (real) events of a padded
[B, L] batch (packing.py), and the tests hold that computation to the padded one, dropout
included. With ``nn.Dropout`` that meant drawing every mask at the padded shape [B, L, D] and
keeping the real events' part: on the default run's data ~5x the draws needed, and
``bernoulli_`` alone took ~29% of a training step. Here the mask of event slot ``s``
(``b * L + l``) and feature ``d`` is a pure function of the step's seed, ``s`` and ``d``: the
packed and padded computations get the same masks while only the carried events are drawn, and
a forward pass needs no stored mask for its backward (it is recomputed).

The seed is one draw from torch's default generator per call, so ``torch.manual_seed``
(``training.set_seed``) makes training repeatable as before. The hash is MurmurHash3's 32-bit
finalizer (a bijection with full avalanche) applied twice with the seed's two halves as keys; an
element is dropped when its hash is below ``p * 2^32``. The C kernel (model_lib/native.py) and the
numpy reference (``keep_mask``, used without a compiler and by the tests) compute the same bits.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np
import torch
from torch import Tensor

from model_lib import native

ROW_MULTIPLIER = 0x9E3779B1  # odd: slot -> row key stays a bijection
FEATURE_MULTIPLIER = 0x85EBCA77

SOURCE = r"""
#include <stdint.h>

static inline uint32_t fmix32(uint32_t h) { /* MurmurHash3's finalizer */
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* out [N, D] = x * scale where the hash of (seed, slots[n], d) >= threshold, else 0;
   slots [N] (NULL: row n is slot n). In place is fine (out == x). */
void slot_dropout(const float *x, const int64_t *slots, int64_t N, int64_t D, uint64_t seed, uint32_t threshold,
                  float scale, float *out) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int64_t n = 0; n < N; n++) {
        const uint64_t slot = slots ? (uint64_t)slots[n] : (uint64_t)n;
        const uint32_t row = fmix32((uint32_t)slot * 0x9E3779B1u + k0) ^ fmix32((uint32_t)(slot >> 32) + k1);
        const float *xr = x + n * D;
        float *o = out + n * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            const uint32_t h = fmix32(fmix32(row + (uint32_t)d * 0x85EBCA77u) ^ k1);
            o[d] = h >= threshold ? xr[d] * scale : 0.0f;
        }
    }
}
"""


@cache
def kernel() -> ctypes.CDLL | None:
    """The built library, or None (no C compiler, a failed build, or ``TRACE_NATIVE_KERNELS=0``)."""
    lib = native.build("slot_dropout", SOURCE)
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.slot_dropout.argtypes = [p, p, i64, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, p]
    lib.slot_dropout.restype = None
    return lib


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def threshold_of(p: float) -> int:
    """Hashes below this are dropped: P(drop) = threshold / 2^32 = p to within 2^-32."""
    return min(round(p * 2**32), 2**32 - 1)


def keep_mask(slots: np.ndarray, n_features: int, seed: int, p: float) -> np.ndarray:
    """The mask [N, D] (True = kept) of the events in ``slots`` [N]: the kernel's bits, in numpy."""
    slots = np.asarray(slots, dtype=np.uint64)
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as in C
        lo, hi = (slots & np.uint64(0xFFFFFFFF)).astype(np.uint32), (slots >> np.uint64(32)).astype(np.uint32)
        row = _fmix32(lo * np.uint32(ROW_MULTIPLIER) + k0) ^ _fmix32(hi + k1)  # [N]
        features = np.arange(n_features, dtype=np.uint32) * np.uint32(FEATURE_MULTIPLIER)  # [D]
        h = _fmix32(_fmix32(row[:, None] + features[None, :]) ^ k1)  # [N, D]
    return h >= np.uint32(threshold_of(p))


def _apply(
    x: Tensor, slots: Tensor | None, seed: int, p: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(x with the mask applied, the mask if it was materialised: the reference path keeps it for
    the backward pass instead of hashing again; the kernel recomputes it, cheaper than storing)."""
    scale = 1.0 / (1.0 - p)
    lib = kernel()
    if mask is None and lib is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        x = x.contiguous()
        out = torch.empty_like(x)
        lib.slot_dropout(
            x.data_ptr(),
            None if slots is None else slots.data_ptr(),
            x.shape[0],
            x.shape[1],
            seed,
            threshold_of(p),
            scale,
            out.data_ptr(),
        )
        return out, None
    if mask is None:
        where = np.arange(x.shape[0]) if slots is None else slots.cpu().numpy()
        mask = torch.from_numpy(keep_mask(where, x.shape[1], seed, p)).to(x.device)
    return x * mask * scale, mask


class _SlotDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, slots: Tensor | None, seed: int, p: float) -> Tensor:
        out, mask = _apply(x, slots, seed, p)
        ctx.slots, ctx.seed, ctx.p, ctx.mask = slots, seed, p, mask
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _apply(grad, ctx.slots, ctx.seed, ctx.p, ctx.mask)[0], None, None, None  # the same mask and scale


def slot_dropout(x: Tensor, p: float, slots: Tensor | None = None) -> Tensor:
    """Dropout (training) of events ``x`` [N, D] sitting in padded slots ``slots`` [N] int64
    (None: row n is slot n), with a fresh seed from torch's default generator."""
    if p == 0:
        return x
    if p >= 1:
        return x * 0
    if slots is not None:
        slots = slots.to(torch.int64).contiguous()
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return _SlotDropout.apply(x.reshape(x.shape[0], -1), slots, seed, p).view(x.shape)


__all__ = ["keep_mask", "slot_dropout", "threshold_of"]
