r"""Single-pass CPU kernel for low-precision SGD-SaI state (:mod:`sai_dist.momentum`).

One call per piece reads ``p``, ``g``, ``m`` (and, for int8, the block's scale) once and
writes ``p``, ``m`` (and the scale) once, for parameters {float32, bfloat16} (gradient of
the same dtype) × momentum {float32, bfloat16, int8}. Per block of
:data:`~sai_dist.momentum.BLOCK` elements of the piece (OpenMP splits the blocks):

.. math::
    m' = b\,\hat m + c\,g \;(\text{or } c\,g \text{ when born}),\qquad
    p' = d\,p + a\,m'

in float32 (``-std=c99``: no FMA contraction), ``\hat m`` the decoded buffer; ``m'`` is
kept in a block-sized stack buffer so the int8 absmax scale of the block is known before
its codes are written. Stochastic rounding draws the bits of the documented counter-based
hash (:mod:`sai_dist.momentum`: the same ``mix`` in ``uint32_t``, the same keys computed
in Python), so the kernel and the torch reference round with the same random bits; their
float32 arithmetic may differ in the last bit (torch's vectorized ``add(alpha=)`` fuses a
multiply-add), which changes a stochastic rounding only when the value sits within that
bit of its threshold (tested: all elements within one unit of the stored type, > 99 %
identical).

Built like :mod:`sai_dist.native` (system compiler, cached by source, compiler and
machine; ``SAI_DIST_NATIVE=0`` disables it, and the torch reference runs instead).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from sai_dist import native
from sai_dist.momentum import BLOCK, STREAM_MOMENTUM, STREAM_PARAM, Rounding

__all__ = ["library", "step_piece", "supported"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK SAI_BLOCK
#ifdef SAI_MULTIVERSION
#define SAI_TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define SAI_TARGETS
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x5bd1e995u; x ^= x >> 16;
    return x;
}
INLINE uint32_t draw(uint32_t key, int64_t index) {
    return mix(mix(key ^ (uint32_t)index) ^ (uint32_t)((uint64_t)index >> 32));
}
INLINE float bf16_to_f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
/* Branch-free (vectorizable): non-finite values round to nearest (NaN stays NaN, quiet). */
INLINE uint16_t f_to_bf16(float f, uint32_t add, int stochastic) {
    uint32_t u; memcpy(&u, &f, 4);
    const uint32_t nearest = u + 0x7fffu + ((u >> 16) & 1u);
    const int finite = (u & 0x7f800000u) != 0x7f800000u;
    const int nan = !finite && (u & 0x007fffffu);
    uint32_t r = (stochastic && finite) ? u + (add >> 16) : (finite ? nearest : u);
    r = nan ? (u | 0x00400000u) : r;
    return (uint16_t)(r >> 16);
}

/* Hash bits of one block: out[j] = draw(key, base + j). When the low 32 bits of the index
   do not wrap inside the block (always, but for a block straddling a 2^32 boundary) the
   high word is one constant, and the loop is a pure uint32 expression (vectorizes). */
INLINE void draws(uint32_t *out, uint32_t key, int64_t base, int len) {
    const uint32_t lo = (uint32_t)base, hi = (uint32_t)((uint64_t)base >> 32);
    if ((uint64_t)lo + (uint64_t)len <= 0x100000000ull) {
        for (int j = 0; j < len; j++) out[j] = mix(mix(key ^ (lo + (uint32_t)j)) ^ hi);
    } else {
        for (int j = 0; j < len; j++) out[j] = draw(key, base + j);
    }
}

/* One block; PK: 0 float32, 1 bfloat16 parameter (and gradient); MK: 0 float32,
   1 bfloat16, 2 int8, -1 no momentum. Constants after inlining: every combination is its
   own branch-free set of passes. The passes run over the block (<= BLOCK elements, held
   in L1 in stack buffers) so that each is a simple loop gcc vectorizes:
   decode+update -> absmax -> hash bits -> encode -> parameter update. */
INLINE void block(void *p, const void *g, void *m, float *scales, int64_t s, int len, const int PK,
                  const int MK, int born, float b, float c, float d, float a, uint32_t key_m,
                  uint32_t key_p, int64_t offset, const int RP) {
    float mn[BLOCK];
    uint32_t bits[BLOCK];
    const float old_scale = (MK == 2 && !born) ? scales[s / BLOCK] : 0.0f;
    const float *gf = (const float *)g + s;
    const uint16_t *gh = (const uint16_t *)g + s;
    /* pass 1: m' = b m + c g (born: c g; no momentum: g) */
    if (MK < 0) {
        for (int j = 0; j < len; j++) mn[j] = PK ? bf16_to_f(gh[j]) : gf[j];
    } else if (born) {
        for (int j = 0; j < len; j++) {
            const float gi = PK ? bf16_to_f(gh[j]) : gf[j];
            mn[j] = gi * c;
        }
    } else {
        for (int j = 0; j < len; j++) {
            const float gi = PK ? bf16_to_f(gh[j]) : gf[j];
            float mo;
            if (MK == 0) mo = ((const float *)m)[s + j];
            else if (MK == 1) mo = bf16_to_f(((const uint16_t *)m)[s + j]);
            else mo = (float)((const int8_t *)m)[s + j] * old_scale;
            const float mb = mo * b;
            const float cg = gi * c;
            mn[j] = mb + cg;
        }
    }
    /* pass 2: store the momentum */
    if (MK == 0) {
        memcpy((float *)m + s, mn, (size_t)len * sizeof(float));
    } else if (MK == 1) {
        uint16_t *mh = (uint16_t *)m + s;
        draws(bits, key_m, offset + s, len);
        for (int j = 0; j < len; j++) mh[j] = f_to_bf16(mn[j], bits[j], 1);
    } else if (MK == 2) {
        /* absmax over the bit patterns of |v| (ordered like the floats for non-negative
           values); a NaN is skipped, as the float compare av > absmax skipped it */
        uint32_t amax = 0u;
        for (int j = 0; j < len; j++) {
            uint32_t u; memcpy(&u, &mn[j], 4);
            u &= 0x7fffffffu;
            u = u > 0x7f800000u ? 0u : u;
            amax = u > amax ? u : amax;
        }
        float absmax; memcpy(&absmax, &amax, 4);
        const float scale = absmax / 127.0f;
        scales[s / BLOCK] = scale;
        /* scale 0 means every v of the block is 0: dividing by 1 gives the 0 torch's
           where() gives, without a branch (a guarded division blocks vectorization) */
        const float safe = scale > 0.0f ? scale : 1.0f;
        int8_t *mq = (int8_t *)m + s;
        draws(bits, key_m, offset + s, len);
        for (int j = 0; j < len; j++) {
            float q = mn[j] / safe;
            const float u = (float)(int32_t)(bits[j] >> 8) * 5.9604644775390625e-08f;
            q = q + u;
            /* floor by truncation (floorf may be a call): clamped to |q| <= 127 first */
            q = q > 127.0f ? 127.0f : q;
            q = q < -127.0f ? -127.0f : q;
            int32_t t = (int32_t)q;
            t -= (int32_t)((float)t > q);
            mq[j] = (int8_t)t;
        }
    }
    /* pass 3: p' = d p + a m' */
    if (PK) {
        uint16_t *ph = (uint16_t *)p + s;
        if (RP) {
            draws(bits, key_p, offset + s, len);
            for (int j = 0; j < len; j++) {
                const float pd = bf16_to_f(ph[j]) * d;
                const float am = mn[j] * a;
                ph[j] = f_to_bf16(pd + am, bits[j], 1);
            }
        } else {
            for (int j = 0; j < len; j++) {
                const float pd = bf16_to_f(ph[j]) * d;
                const float am = mn[j] * a;
                ph[j] = f_to_bf16(pd + am, 0u, 0);
            }
        }
    } else {
        float *pp = (float *)p + s;
        for (int j = 0; j < len; j++) {
            const float pd = pp[j] * d;
            const float am = mn[j] * a;
            pp[j] = pd + am;
        }
    }
}

#define CASE(PK, MK)                                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nblocks > 16)")       \
    for (int64_t k = 0; k < nblocks; k++) {                                                   \
        const int64_t s = k * BLOCK; const int len = (int)((s + BLOCK < n ? s + BLOCK : n) - s);             \
        if (round_p) block(p, g, m, scales, s, len, PK, MK, born, b, c, d, a, key_m, key_p, offset, 1); \
        else block(p, g, m, scales, s, len, PK, MK, born, b, c, d, a, key_m, key_p, offset, 0); \
    }                                                                                         \
    return;

/* coef = {b, c, d, a}: m' = b m + c g (born: c g), p' = d p + a m'. round_p: stochastic
   rounding of a bfloat16 parameter (else nearest). */
SAI_TARGETS void sai_lowp_piece(void *p, const void *g, void *m, float *scales, int64_t n, int pk,
                                int mk, int born, const float *coef, uint32_t key_m, uint32_t key_p,
                                int64_t offset, int round_p, int nthreads) {
    const float b = coef[0], c = coef[1], d = coef[2], a = coef[3];
    const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    if (pk == 0) {
        if (mk == 0) { CASE(0, 0) } else if (mk == 1) { CASE(0, 1) } else if (mk == 2) { CASE(0, 2) }
        else { CASE(0, -1) }
    } else {
        if (mk == 0) { CASE(1, 0) } else if (mk == 1) { CASE(1, 1) } else if (mk == 2) { CASE(1, 2) }
        else { CASE(1, -1) }
    }
}
""".replace("SAI_BLOCK", str(BLOCK))

_reason: str | None = None
_PK = {torch.float32: 0, torch.bfloat16: 1}
_MK = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; ``None`` when unavailable."""
    global _reason
    try:
        lib = native.load_c_library("sai_lowp", _SOURCE, libs=["-lm"])
    except native.KernelUnavailable as exc:
        _reason = f"the low-precision kernel: {exc}"
        return None
    ptr, i64, i32, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32
    lib.sai_lowp_piece.argtypes = [ptr, ptr, ptr, ptr, i64, i32, i32, i32, ptr, u32, u32, i64, i32, i32]
    lib.sai_lowp_piece.restype = None
    _reason = None
    return lib


def supported(param: Tensor, grad: Tensor, buf: Tensor | None) -> bool:
    """Contiguous CPU tensors: parameter float32 or bfloat16 with a gradient of its dtype,
    buffer float32, bfloat16 or int8 (or none)."""
    tensors = [t for t in (param, grad, buf) if t is not None]
    return (
        param.dtype in _PK
        and grad.dtype == param.dtype
        and (buf is None or buf.dtype in _MK)
        and all(t.device.type == "cpu" and t.is_contiguous() and t.shape == param.shape for t in tensors)
        and all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors)
    )


def step_piece(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    scales: Tensor | None,
    *,
    born: bool,
    coef: Sequence[float],
    rounding: Rounding | None,
    round_param: bool,
) -> None:
    """One piece through the kernel; ``coef = (b, c, d, a)`` as in :mod:`sai_dist.native`."""
    lib = library()
    assert lib is not None
    n = param.numel()
    if n == 0:
        return
    coef_t = torch.tensor(list(coef), dtype=torch.float32)
    key_m = rounding.key(STREAM_MOMENTUM) if rounding is not None else 0
    key_p = rounding.key(STREAM_PARAM) if rounding is not None else 0
    lib.sai_lowp_piece(
        param.data_ptr(),
        grad.data_ptr(),
        0 if buf is None else buf.data_ptr(),
        0 if scales is None else scales.data_ptr(),
        n,
        _PK[param.dtype],
        -1 if buf is None else _MK[buf.dtype],
        int(born),
        coef_t.data_ptr(),
        key_m,
        key_p,
        0 if rounding is None else rounding.offset,
        int(round_param and rounding is not None),
        torch.get_num_threads(),
    )
    torch.autograd.graph.increment_version([t for t in (param, buf) if t is not None])
