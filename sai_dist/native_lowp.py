r"""Single-pass CPU kernel for low-precision SGD-SaI state (:mod:`sai_dist.momentum`).

One call per parameter group and step (a :class:`Batch` of every piece the kernel takes) reads each piece's
``p``, ``g``, ``m`` (and, for int8, the block's scale) once and writes ``p``, ``m`` (and the
scale) once, for parameters {float32, bfloat16} (gradient of the same dtype) × momentum
{float32, bfloat16, int8}. Per block of :data:`~sai_dist.momentum.BLOCK` elements of a
piece (OpenMP splits the blocks of all pieces in one loop):

.. math::
    m' = \operatorname{fma}(g, c, \hat m\,b) \;(\text{or } c\,g \text{ when born}),\qquad
    p' = \operatorname{fma}(m', a, p\,d)

in float32, ``\hat m`` the decoded buffer, every product rounded once and each ``fma``
rounded once: exactly what the torch reference (:func:`sai_dist.functional._low_precision_sgd_sai`)
computes, whose ``m.mul_(b).add_(g, alpha=c)`` and ``p.mul_(d).add_(m, alpha=a)`` are a
rounded product and a fused multiply-add in torch's CPU kernels (checked by the tests).
Stochastic rounding draws the bits of the documented counter-based hash
(:mod:`sai_dist.momentum`: the same ``mix`` in ``uint32_t``, the key derived in C from
``(seed, step, block)`` and the index's high word by the documented formula; one draw per
element, computed once and shared: its high 16 bits round a bfloat16 parameter, its low 16
the momentum) and rounds as the reference does (bfloat16: add the 16 bits, truncate; int8:
``floor(v * (1 / s) + u)``, clamped to ±127, dividing in a block whose ``1 / s``
overflows), so kernel and reference agree bit for bit.

The same per-element operations in three implementations, one source:

- AVX-512F + BW (16 lanes, two vectors a step: a bfloat16 array moves through word
  permutes, one load or store per 32 elements) and AVX2 + FMA (8 lanes) intrinsics: the
  hash's ``uint32`` multiply-xorshift mixing, bf16 conversion and stochastic rounding, int8
  decode, absmax on the ``|v|`` bit patterns, int8 encode, the parameter update. The build
  takes the widest one whose features ``/proc/cpuinfo`` lists
  (``-mavx2 -mfma [-mavx512f -mavx512bw]``; the flags are
  in the cache key), at most ``SAI_DIST_LOWP_SIMD`` (``avx512``, ``avx2``, or ``0``: the
  portable build). For int8 the new values of a block stay in a block-sized stack buffer
  (L1) so the block's absmax scale is known before its codes are written; the other
  combinations are one pass.
- The scalar definition (``fmaf`` for the fused multiply-adds): the portable build's only
  path, and, in a vector build, a block's last ``len mod lanes`` elements and any block
  whose element index crosses a multiple of :math:`2^{32}` (the vector hash keeps the
  index's high word constant over a block), and the codes of an int8 block whose
  ``1 / s`` overflows (it divides).

Built like :mod:`sai_dist.native` (system compiler, cached by source, flags, compiler and
machine; ``SAI_DIST_NATIVE=0`` disables it, and the torch reference runs instead).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from sai_dist import native
from sai_dist.momentum import BLOCK, Rounding

__all__ = ["Batch", "isa_flags", "lanes", "library", "supported"]

#: Vector builds, widest first: (``SAI_DIST_LOWP_SIMD`` name, CPU flags it needs, compiler flags).
_BUILDS = (
    ("avx512", ("avx2", "fma", "avx512f", "avx512bw"), ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw")),
    ("avx2", ("avx2", "fma"), ("-mavx2", "-mfma")),
)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
/* The AVX-512 path uses F and BW (word permutes) together. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SAI_AVX512 1
#endif

#define BLOCK SAI_BLOCK
#define INLINE static inline __attribute__((always_inline))
/* Software prefetch. The int8 block is two passes (absmax, then codes): a stream the
   hardware prefetcher follows in one pass stalls in the other, so each pass fetches what
   the other reads next (measured on a Xeon, 1 thread: int8 momentum 1.10 -> 0.86 of the
   fp32 step, with bf16 parameters 1.04 -> 0.61). A prefetch never faults, so one past the
   piece's end is harmless. */
#define PREFETCH_R(addr) __builtin_prefetch((addr), 0, 3)
#define PREFETCH_W(addr) __builtin_prefetch((addr), 1, 3)
/* One-pass blocks: g, p and m 1024 elements ahead of element i. Intel's L2 streamer stops
   at every 4 KiB page and must find the stream again; this keeps the lines coming
   (measured on a Xeon: bf16 parameters and momentum 0.71 -> 0.50 of the fp32 step). */
#define PREFETCH_AHEAD(p, g, m, i, PK, MK)                                                       \
    do {                                                                                          \
        PREFETCH_R((const char *)(g) + ((i) + 1024) * ((PK) ? 2 : 4));                           \
        PREFETCH_W((char *)(p) + ((i) + 1024) * ((PK) ? 2 : 4));                                 \
        if ((MK) >= 0) PREFETCH_W((char *)(m) + ((i) + 1024) * ((MK) == 0 ? 4 : 2));             \
    } while (0)

/* ---- the scalar definition (fallback, tails, blocks whose index wraps 2^32) ---------- */

INLINE uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x5bd1e995u; x ^= x >> 16;
    return x;
}
/* The key of the elements whose index has the high word of `index`: key is the
   (seed, step, block) key. */
INLINE uint32_t key_of(uint32_t key, int64_t index) {
    return mix(key ^ (uint32_t)((uint64_t)index >> 32));
}
/* The draw of element base + j, kh0 the key of base's high word. */
INLINE uint32_t draw_at(uint32_t key, uint32_t kh0, int64_t base, int j) {
    const int64_t index = base + j;
    const uint32_t kh = ((uint64_t)index >> 32) == ((uint64_t)base >> 32) ? kh0 : key_of(key, index);
    return mix(kh ^ (uint32_t)index);
}
INLINE float bf16_to_f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
/* r16: 16 random bits. Non-finite values round to nearest (NaN stays NaN, quiet). */
INLINE uint16_t f_to_bf16(float f, uint32_t r16, int stochastic) {
    uint32_t u; memcpy(&u, &f, 4);
    const uint32_t nearest = u + 0x7fffu + ((u >> 16) & 1u);
    const int finite = (u & 0x7f800000u) != 0x7f800000u;
    const int nan = !finite && (u & 0x007fffffu);
    uint32_t r = (stochastic && finite) ? u + r16 : (finite ? nearest : u);
    r = nan ? (u | 0x00400000u) : r;
    return (uint16_t)(r >> 16);
}
/* |v| as ordered bits, NaN as 0 (skipped by the absmax, as torch's compare skipped it) */
INLINE uint32_t abs_bits(float v) {
    uint32_t u; memcpy(&u, &v, 4);
    u &= 0x7fffffffu;
    return u > 0x7f800000u ? 0u : u;
}

/* Element i (index in the piece) of the update: m' = b m + c g, computed as torch's
   m.mul_(b).add_(g, alpha=c) computes it: one rounded product, then a fused multiply-add.
   born: c g; no momentum (MK < 0): g. */
INLINE float elem_m(const void *g, const void *m, int64_t i, const int PK, const int MK, int born,
                    float b, float c, float old_scale) {
    const float gi = PK ? bf16_to_f(((const uint16_t *)g)[i]) : ((const float *)g)[i];
    if (MK < 0) return gi;
    if (born) return gi * c;
    float mo;
    if (MK == 0) mo = ((const float *)m)[i];
    else if (MK == 1) mo = bf16_to_f(((const uint16_t *)m)[i]);
    else mo = (float)((const int8_t *)m)[i] * old_scale;
    return fmaf(gi, c, mo * b);
}
/* int8: the new values mn[j0 .. len) of the block at s element by element, and the
   absmax of their |v| bit patterns (NaN skipped). */
INLINE uint32_t new_values(const void *g, const void *m, int64_t s, int j0, int len, float *mn,
                           const int PK, const int MK, int born, float b, float c, float old_scale) {
    uint32_t amax = 0u;
    for (int j = j0; j < len; j++) {
        mn[j] = elem_m(g, m, s + j, PK, MK, born, b, c, old_scale);
        const uint32_t u = abs_bits(mn[j]);
        amax = u > amax ? u : amax;
    }
    return amax;
}
/* p' = d p + a m' as torch's p.mul_(d).add_(m', alpha=a): product, then fused multiply-add;
   a bfloat16 parameter rounds with the high 16 bits of the element's draw. */
INLINE void elem_p(void *p, int64_t i, float mv, const int PK, const int RP, float d, float a,
                   uint32_t bits) {
    if (PK) {
        uint16_t *ph = (uint16_t *)p;
        const float v = fmaf(mv, a, bf16_to_f(ph[i]) * d);
        ph[i] = f_to_bf16(v, bits >> 16, RP);
    } else {
        float *pp = (float *)p;
        pp[i] = fmaf(mv, a, pp[i] * d);
    }
}
/* Momentum store of float32 / bfloat16 (stochastic, the low 16 bits of the draw) buffers. */
INLINE void elem_store_m(void *m, int64_t i, float mv, const int MK, uint32_t bits) {
    if (MK == 0) ((float *)m)[i] = mv;
    else if (MK == 1) ((uint16_t *)m)[i] = f_to_bf16(mv, bits & 0xffffu, 1);
}
/* int8 code: floor(v * recip + u), u = r16 / 2^16, clamped to [-127, 127]; recip = 1 / scale
   rounded (0 for a zero scale: v * 0 = +-0, code 0, the 0 torch's where(scale > 0, ...)
   gives); div: 1 / scale overflowed (scale below 2^-128), so v / scale. */
INLINE int8_t elem_code(float v, float recip, float scale, int div, uint32_t r16) {
    float q = div ? v / scale : v * recip;
    q = q + (float)(int32_t)r16 * 1.52587890625e-05f;
    q = q > 127.0f ? 127.0f : q;
    q = q < -127.0f ? -127.0f : q;
    int32_t t = (int32_t)q; /* floor by truncation: |q| <= 127 */
    t -= (int32_t)((float)t > q);
    return (int8_t)t;
}
/* max abs_bits over v[0 .. len) */
static uint32_t absmax_bits(const float *v, int len) {
    uint32_t amax = 0u;
    for (int j = 0; j < len; j++) {
        const uint32_t u = abs_bits(v[j]);
        amax = u > amax ? u : amax;
    }
    return amax;
}
INLINE float scale_of(uint32_t amax) {
    float absmax; memcpy(&absmax, &amax, 4);
    return absmax / 127.0f;
}
INLINE float recip_of(float scale) { return scale > 0.0f ? 1.0f / scale : 0.0f; }

/* Does this combination draw random bits? bfloat16 / int8 momentum, or a bfloat16
   parameter rounded stochastically. */
#define DRAWS(PK, MK, RP) ((MK) == 1 || (MK) == 2 || ((PK) && (RP)))

/* int8 codes and the parameter update of elements [j0, len) of the block at s, whose new
   momentum values are mn[j0 ..) and scale `scale`. */
INLINE void codes_tail(void *p, void *m, int64_t s, int j0, int len, const float *mn, float scale,
                       const int PK, const int RP, float d, float a, uint32_t key, uint32_t kh0,
                       int64_t base) {
    const float recip = recip_of(scale);
    const int div = isinf(recip);
    int8_t *mq = (int8_t *)m;
    for (int j = j0; j < len; j++) {
        const uint32_t bits = draw_at(key, kh0, base, j);
        mq[s + j] = elem_code(mn[j], recip, scale, div, bits & 0xffffu);
        elem_p(p, s + j, mn[j], PK, RP, d, a, bits);
    }
}

/* One block (elements [s, s + len) of the piece) element by element, from element j0 on
   (j0 = 0 for int8). */
INLINE void block_tail(void *p, const void *g, void *m, float *scales, int64_t s, int len, int j0,
                       float *mn, const int PK, const int MK, int born, float b, float c, float d,
                       float a, uint32_t key, int64_t offset, const int RP, float old_scale) {
    const int64_t base = offset + s;
    const uint32_t kh0 = key_of(key, base);
    if (MK != 2) {
        for (int j = j0; j < len; j++) {
            const float mv = elem_m(g, m, s + j, PK, MK, born, b, c, old_scale);
            const uint32_t bits = DRAWS(PK, MK, RP) ? draw_at(key, kh0, base, j) : 0u;
            elem_store_m(m, s + j, mv, MK, bits);
            elem_p(p, s + j, mv, PK, RP, d, a, bits);
        }
        return;
    }
    const uint32_t amax = new_values(g, m, s, 0, len, mn, PK, MK, born, b, c, old_scale);
    const float scale = scale_of(amax);
    scales[s / BLOCK] = scale;
    codes_tail(p, m, s, 0, len, mn, scale, PK, RP, d, a, key, kh0, base);
}

#ifdef __AVX2__
/* ---- AVX2: the same operations on 8 lanes ------------------------------------------- */

INLINE __m256i mix8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x5bd1e995));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
/* The draws of 8 consecutive indices whose low words lo .. lo + 7 do not wrap (kh: the key
   of their one high word). */
INLINE __m256i draw8(uint32_t kh, uint32_t lo) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)lo), lane);
    return mix8(_mm256_xor_si256(idx, _mm256_set1_epi32((int)kh)));
}
INLINE __m256 load_bf16(const uint16_t *x) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
INLINE __m256 load_g(const void *g, int64_t i, const int PK) {
    return PK ? load_bf16((const uint16_t *)g + i) : _mm256_loadu_ps((const float *)g + i);
}
/* f_to_bf16 on 8 lanes (r16: 16 random bits a lane), stored. */
INLINE void store_bf16(uint16_t *out, __m256 v, __m256i r16, const int stochastic) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m256i add;
    if (stochastic) {
        add = r16;
    } else {
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        add = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd);
    }
    /* no finite mask: an infinity's low 16 bits are 0 and add < 2^16, so it stays infinite */
    __m256i r = _mm256_add_epi32(u, add);
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    _mm_storeu_si128((__m128i *)out,
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
INLINE __m256i low16_8(__m256i bits) { return _mm256_and_si256(bits, _mm256_set1_epi32(0xffff)); }
INLINE __m256 vec_m(const void *g, const void *m, int64_t i, const int PK, const int MK, int born,
                    __m256 b, __m256 c, __m256 old_scale) {
    const __m256 gi = load_g(g, i, PK);
    if (MK < 0) return gi;
    if (born) return _mm256_mul_ps(gi, c);
    __m256 mo;
    if (MK == 0) mo = _mm256_loadu_ps((const float *)m + i);
    else if (MK == 1) mo = load_bf16((const uint16_t *)m + i);
    else mo = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)m + i)))),
        old_scale);
    return _mm256_fmadd_ps(gi, c, _mm256_mul_ps(mo, b));
}
INLINE void vec_p(void *p, int64_t i, __m256 mv, const int PK, const int RP, __m256 d, __m256 a,
                  __m256i bits) {
    if (PK) {
        uint16_t *ph = (uint16_t *)p + i;
        const __m256 v = _mm256_fmadd_ps(mv, a, _mm256_mul_ps(load_bf16(ph), d));
        store_bf16(ph, v, _mm256_srli_epi32(bits, 16), RP);
    } else {
        float *pp = (float *)p + i;
        _mm256_storeu_ps(pp, _mm256_fmadd_ps(mv, a, _mm256_mul_ps(_mm256_loadu_ps(pp), d)));
    }
}
/* elem_code on 8 lanes (not div); the low byte of each int32 is stored (as the scalar cast). */
INLINE void store_codes(int8_t *out, __m256 v, __m256 recip, __m256i r16) {
    /* q = v * recip + u as one fma: r16 * 2^-16 is exact, so the one rounding is the add's */
    __m256 q = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r16), _mm256_set1_ps(1.52587890625e-05f),
                               _mm256_mul_ps(v, recip));
    /* operand order keeps a NaN q (min/max return the second operand on NaN) */
    q = _mm256_min_ps(_mm256_set1_ps(127.0f), q);
    q = _mm256_max_ps(_mm256_set1_ps(-127.0f), q);
    const __m256i t = _mm256_cvttps_epi32(_mm256_floor_ps(q));
    const __m256i lowbytes = _mm256_shuffle_epi8(
        t, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m256i packed = _mm256_permutevar8x32_epi32(lowbytes, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
    _mm_storel_epi64((__m128i *)out, _mm256_castsi256_si128(packed));
}

INLINE void block_avx2(void *p, const void *g, void *m, float *scales, int64_t s, int len,
                       const int PK, const int MK, int born, float b, float c, float d, float a,
                       uint32_t key, int64_t offset, const int RP) {
    float mn[BLOCK];
    const float old_scale = (MK == 2 && !born) ? scales[s / BLOCK] : 0.0f;
    const int64_t base = offset + s;
    const uint32_t lo = (uint32_t)base, kh = key_of(key, base);
    const int len8 = len & ~7;
    const __m256 vb = _mm256_set1_ps(b), vc = _mm256_set1_ps(c), vd = _mm256_set1_ps(d);
    const __m256 va = _mm256_set1_ps(a), vs = _mm256_set1_ps(old_scale);
    if (MK != 2) {
        for (int j = 0; j < len8; j += 8) {
            PREFETCH_AHEAD(p, g, m, s + j, PK, MK);
            const __m256 mv = vec_m(g, m, s + j, PK, MK, born, vb, vc, vs);
            const __m256i bits = DRAWS(PK, MK, RP) ? draw8(kh, lo + (uint32_t)j) : _mm256_setzero_si256();
            if (MK == 0) _mm256_storeu_ps((float *)m + s + j, mv);
            else if (MK == 1) store_bf16((uint16_t *)m + s + j, mv, low16_8(bits), 1);
            vec_p(p, s + j, mv, PK, RP, vd, va, bits);
        }
        block_tail(p, g, m, scales, s, len, len8, mn, PK, MK, born, b, c, d, a, key, offset, RP,
                   old_scale);
        return;
    }
    /* int8: the new values and their absmax first (the scale precedes every code) */
    /* absmax of the |v| bit patterns; a NaN (above infinity's pattern) is skipped by a
       rescan of the block, which only a block holding one pays */
    __m256i vmax = _mm256_setzero_si256();
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    for (int j = 0; j < len8; j += 8) {
        PREFETCH_W((char *)p + (s + j) * (PK ? 2 : 4)); /* read first by the second pass */
        const __m256 mv = vec_m(g, m, s + j, PK, MK, born, vb, vc, vs);
        _mm256_storeu_ps(mn + j, mv);
        vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_castps_si256(mv), mask));
    }
    uint32_t lanes[8], amax = 0u;
    _mm256_storeu_si256((__m256i *)lanes, vmax);
    for (int k = 0; k < 8; k++) amax = lanes[k] > amax ? lanes[k] : amax;
    if (amax > 0x7f800000u) amax = absmax_bits(mn, len8);
    const uint32_t tail = new_values(g, m, s, len8, len, mn, PK, MK, born, b, c, old_scale);
    amax = tail > amax ? tail : amax;
    const float scale = scale_of(amax);
    scales[s / BLOCK] = scale;
    const float recip = recip_of(scale);
    int j = 0;
    if (!isinf(recip)) {
        const __m256 vrecip = _mm256_set1_ps(recip);
        int8_t *mq = (int8_t *)m + s;
        for (; j < len8; j += 8) {
            /* the next block's g and m, which its first pass reads */
            PREFETCH_R((const char *)g + (s + BLOCK + j) * (PK ? 2 : 4));
            PREFETCH_W((char *)m + s + BLOCK + j);
            const __m256 mv = _mm256_loadu_ps(mn + j);
            const __m256i bits = draw8(kh, lo + (uint32_t)j);
            store_codes(mq + j, mv, vrecip, low16_8(bits));
            vec_p(p, s + j, mv, PK, RP, vd, va, bits);
        }
    }
    codes_tail(p, m, s, j, len, mn, scale, PK, RP, d, a, key, kh, base);
}
#endif

#ifdef SAI_AVX512
/* ---- AVX-512F + BW: the same operations on 16 lanes, two vectors a step ----------------- */

INLINE __m512i mix16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x5bd1e995));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
/* The draws of the 16 indices whose low words are idx (no wrap: one high word, key kh). */
INLINE __m512i draw16(__m512i idx, __m512i kh) { return mix16(_mm512_xor_si512(idx, kh)); }
INLINE __m512i low16_16(__m512i bits) { return _mm512_and_si512(bits, _mm512_set1_epi32(0xffff)); }
INLINE __m512 load_bf16_16(const uint16_t *x) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
/* f_to_bf16 on 16 lanes before its truncation (r16: 16 random bits a lane): u + r16, or
   u + the nearest-even addend, a NaN quieted instead. No finite mask: an infinity's low 16
   bits are 0 and the addend < 2^16, so it stays infinite. */
INLINE __m512i rounded16(__m512 v, __m512i r16, const int stochastic) {
    const __m512i u = _mm512_castps_si512(v);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i add;
    if (stochastic) {
        add = r16;
    } else {
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        add = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
    }
    return _mm512_mask_or_epi32(_mm512_add_epi32(u, add), nan, u, _mm512_set1_epi32(0x00400000));
}
/* f_to_bf16 on 16 lanes, stored (the kept high halves are < 2^16: truncating vpmovdw). */
INLINE void store_bf16_16(uint16_t *out, __m512 v, __m512i r16, const int stochastic) {
    const __m512i high = _mm512_srli_epi32(rounded16(v, r16, stochastic), 16);
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(high));
}
/* Two vectors a step (elements i .. i + 15 in lo, i + 16 .. i + 31 in hi): 32 bfloat16 are
   one load and one word permute per vector, each word moved to the high half of its lane
   with the low half zeroed, instead of a widening load and a shift; stored by one
   two-source permute that keeps the high halves of both, instead of a shift and a
   narrowing store per vector; and one prefetch per cache line. */
static const uint16_t SAI_TO_HIGH_LO[32] = {0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7,
                                            0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15};
static const uint16_t SAI_TO_HIGH_HI[32] = {0, 16, 0, 17, 0, 18, 0, 19, 0, 20, 0, 21, 0, 22, 0, 23,
                                            0, 24, 0, 25, 0, 26, 0, 27, 0, 28, 0, 29, 0, 30, 0, 31};
static const uint16_t SAI_HIGH_WORDS[32] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                            33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
INLINE void load_bf16_32(const uint16_t *x, __m512 *lo, __m512 *hi) {
    const __m512i w = _mm512_loadu_si512((const void *)x);
    const __mmask32 odd = 0xAAAAAAAAu; /* the high word of each lane */
    *lo = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, _mm512_loadu_si512(SAI_TO_HIGH_LO), w));
    *hi = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, _mm512_loadu_si512(SAI_TO_HIGH_HI), w));
}
INLINE void store_bf16_32(uint16_t *out, __m512 lo, __m512 hi, __m512i rlo, __m512i rhi,
                          const int stochastic) {
    const __m512i a = rounded16(lo, rlo, stochastic), b = rounded16(hi, rhi, stochastic);
    _mm512_storeu_si512((void *)out, _mm512_permutex2var_epi16(a, _mm512_loadu_si512(SAI_HIGH_WORDS), b));
}
INLINE void load_f32_32(const void *x, int64_t i, const int K, __m512 *lo, __m512 *hi) {
    if (K) {
        load_bf16_32((const uint16_t *)x + i, lo, hi);
    } else {
        *lo = _mm512_loadu_ps((const float *)x + i);
        *hi = _mm512_loadu_ps((const float *)x + i + 16);
    }
}
INLINE __m512 decode8_16(const int8_t *x, __m512 old_scale) {
    const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)x));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(q), old_scale);
}
/* PREFETCH_AHEAD for 32 elements: a second line of each 4-byte array */
#define PREFETCH_AHEAD32(p, g, m, i, PK, MK)                                                     \
    do {                                                                                          \
        PREFETCH_AHEAD(p, g, m, i, PK, MK);                                                       \
        if (!(PK)) PREFETCH_R((const char *)(g) + ((i) + 1040) * 4);                             \
        if (!(PK)) PREFETCH_W((char *)(p) + ((i) + 1040) * 4);                                   \
        if ((MK) == 0) PREFETCH_W((char *)(m) + ((i) + 1040) * 4);                               \
    } while (0)
INLINE __m512 vec16_m(const void *g, const void *m, int64_t i, const int PK, const int MK, int born,
                      __m512 b, __m512 c, __m512 old_scale) {
    const __m512 gi = PK ? load_bf16_16((const uint16_t *)g + i) : _mm512_loadu_ps((const float *)g + i);
    if (MK < 0) return gi;
    if (born) return _mm512_mul_ps(gi, c);
    __m512 mo;
    if (MK == 0) mo = _mm512_loadu_ps((const float *)m + i);
    else if (MK == 1) mo = load_bf16_16((const uint16_t *)m + i);
    else mo = decode8_16((const int8_t *)m + i, old_scale);
    return _mm512_fmadd_ps(gi, c, _mm512_mul_ps(mo, b));
}
/* vec16_m of elements i .. i + 31 (lo, hi) */
INLINE void vec32_m(const void *g, const void *m, int64_t i, const int PK, const int MK, int born,
                    __m512 b, __m512 c, __m512 old_scale, __m512 *lo, __m512 *hi) {
    __m512 glo, ghi, olo, ohi;
    load_f32_32(g, i, PK, &glo, &ghi);
    if (MK < 0) {
        *lo = glo, *hi = ghi;
        return;
    }
    if (born) {
        *lo = _mm512_mul_ps(glo, c), *hi = _mm512_mul_ps(ghi, c);
        return;
    }
    if (MK == 2) {
        olo = decode8_16((const int8_t *)m + i, old_scale);
        ohi = decode8_16((const int8_t *)m + i + 16, old_scale);
    } else {
        load_f32_32(m, i, MK, &olo, &ohi);
    }
    *lo = _mm512_fmadd_ps(glo, c, _mm512_mul_ps(olo, b));
    *hi = _mm512_fmadd_ps(ghi, c, _mm512_mul_ps(ohi, b));
}
INLINE void vec16_p(void *p, int64_t i, __m512 mv, const int PK, const int RP, __m512 d, __m512 a,
                    __m512i bits) {
    if (PK) {
        uint16_t *ph = (uint16_t *)p + i;
        const __m512 v = _mm512_fmadd_ps(mv, a, _mm512_mul_ps(load_bf16_16(ph), d));
        store_bf16_16(ph, v, _mm512_srli_epi32(bits, 16), RP);
    } else {
        float *pp = (float *)p + i;
        _mm512_storeu_ps(pp, _mm512_fmadd_ps(mv, a, _mm512_mul_ps(_mm512_loadu_ps(pp), d)));
    }
}
/* vec16_p of elements i .. i + 31: new momentum mlo, mhi, draws blo, bhi */
INLINE void vec32_p(void *p, int64_t i, __m512 mlo, __m512 mhi, const int PK, const int RP, __m512 d,
                    __m512 a, __m512i blo, __m512i bhi) {
    if (PK) {
        uint16_t *ph = (uint16_t *)p + i;
        __m512 plo, phi;
        load_bf16_32(ph, &plo, &phi);
        plo = _mm512_fmadd_ps(mlo, a, _mm512_mul_ps(plo, d));
        phi = _mm512_fmadd_ps(mhi, a, _mm512_mul_ps(phi, d));
        store_bf16_32(ph, plo, phi, _mm512_srli_epi32(blo, 16), _mm512_srli_epi32(bhi, 16), RP);
    } else {
        vec16_p(p, i, mlo, PK, RP, d, a, blo);
        vec16_p(p, i + 16, mhi, PK, RP, d, a, bhi);
    }
}
/* elem_code on 16 lanes (not div); vpmovdb keeps the low byte of each int32, as the scalar cast. */
INLINE void store_codes16(int8_t *out, __m512 v, __m512 recip, __m512i r16) {
    /* q = v * recip + u as one fma: r16 * 2^-16 is exact, so the one rounding is the add's */
    __m512 q = _mm512_fmadd_ps(_mm512_cvtepi32_ps(r16), _mm512_set1_ps(1.52587890625e-05f),
                               _mm512_mul_ps(v, recip));
    q = _mm512_min_ps(_mm512_set1_ps(127.0f), q); /* a NaN q passes, as in the scalar code */
    q = _mm512_max_ps(_mm512_set1_ps(-127.0f), q);
    const __m512i t = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    _mm_storeu_si128((__m128i *)out, _mm512_cvtepi32_epi8(t));
}

INLINE void block_avx512(void *p, const void *g, void *m, float *scales, int64_t s, int len,
                         const int PK, const int MK, int born, float b, float c, float d, float a,
                         uint32_t key, int64_t offset, const int RP) {
    float mn[BLOCK];
    const float old_scale = (MK == 2 && !born) ? scales[s / BLOCK] : 0.0f;
    const int64_t base = offset + s;
    const uint32_t kh0 = key_of(key, base);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i idx0 = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)base), lane);
    const __m512i kh = _mm512_set1_epi32((int)kh0);
    const int len16 = len & ~15;
    const __m512 vb = _mm512_set1_ps(b), vc = _mm512_set1_ps(c), vd = _mm512_set1_ps(d);
    const __m512 va = _mm512_set1_ps(a), vs = _mm512_set1_ps(old_scale);
    const __m512i sixteen = _mm512_set1_epi32(16);
    if (MK != 2) {
        int j = 0;
        __m512i idx = idx0; /* the low words of elements j .. j + 15 */
        for (; j + 32 <= len16; j += 32) {
            PREFETCH_AHEAD32(p, g, m, s + j, PK, MK);
            __m512 mlo, mhi;
            vec32_m(g, m, s + j, PK, MK, born, vb, vc, vs, &mlo, &mhi);
            __m512i blo = _mm512_setzero_si512(), bhi = blo;
            if (DRAWS(PK, MK, RP)) {
                blo = draw16(idx, kh);
                bhi = draw16(_mm512_add_epi32(idx, sixteen), kh);
            }
            idx = _mm512_add_epi32(idx, _mm512_add_epi32(sixteen, sixteen));
            if (MK == 0) {
                _mm512_storeu_ps((float *)m + s + j, mlo);
                _mm512_storeu_ps((float *)m + s + j + 16, mhi);
            } else if (MK == 1) {
                store_bf16_32((uint16_t *)m + s + j, mlo, mhi, low16_16(blo), low16_16(bhi), 1);
            }
            vec32_p(p, s + j, mlo, mhi, PK, RP, vd, va, blo, bhi);
        }
        for (; j < len16; j += 16) {
            PREFETCH_AHEAD(p, g, m, s + j, PK, MK);
            const __m512 mv = vec16_m(g, m, s + j, PK, MK, born, vb, vc, vs);
            const __m512i bits = DRAWS(PK, MK, RP) ? draw16(idx, kh) : _mm512_setzero_si512();
            if (MK == 0) _mm512_storeu_ps((float *)m + s + j, mv);
            else if (MK == 1) store_bf16_16((uint16_t *)m + s + j, mv, low16_16(bits), 1);
            vec16_p(p, s + j, mv, PK, RP, vd, va, bits);
            idx = _mm512_add_epi32(idx, sixteen);
        }
        block_tail(p, g, m, scales, s, len, len16, mn, PK, MK, born, b, c, d, a, key, offset, RP,
                   old_scale);
        return;
    }
    /* absmax as in block_avx2: a NaN is skipped by a rescan */
    __m512i vmax = _mm512_setzero_si512(), vmax2 = vmax;
    const __m512i mask = _mm512_set1_epi32(0x7fffffff);
    int j1 = 0;
    for (; j1 + 32 <= len16; j1 += 32) {
        PREFETCH_W((char *)p + (s + j1) * (PK ? 2 : 4)); /* read first by the second pass */
        if (!PK) PREFETCH_W((char *)p + (s + j1 + 16) * 4);
        __m512 mlo, mhi;
        vec32_m(g, m, s + j1, PK, MK, born, vb, vc, vs, &mlo, &mhi);
        _mm512_storeu_ps(mn + j1, mlo);
        _mm512_storeu_ps(mn + j1 + 16, mhi);
        vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_castps_si512(mlo), mask));
        vmax2 = _mm512_max_epu32(vmax2, _mm512_and_si512(_mm512_castps_si512(mhi), mask));
    }
    vmax = _mm512_max_epu32(vmax, vmax2);
    for (int j = j1; j < len16; j += 16) {
        PREFETCH_W((char *)p + (s + j) * (PK ? 2 : 4)); /* read first by the second pass */
        const __m512 mv = vec16_m(g, m, s + j, PK, MK, born, vb, vc, vs);
        _mm512_storeu_ps(mn + j, mv);
        vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_castps_si512(mv), mask));
    }
    uint32_t amax = (uint32_t)_mm512_reduce_max_epu32(vmax);
    if (amax > 0x7f800000u) amax = absmax_bits(mn, len16);
    const uint32_t tail = new_values(g, m, s, len16, len, mn, PK, MK, born, b, c, old_scale);
    amax = tail > amax ? tail : amax;
    const float scale = scale_of(amax);
    scales[s / BLOCK] = scale;
    const float recip = recip_of(scale);
    int j = 0;
    if (!isinf(recip)) {
        const __m512 vrecip = _mm512_set1_ps(recip);
        int8_t *mq = (int8_t *)m + s;
        __m512i idx = idx0;
        for (; j + 32 <= len16; j += 32) {
            /* the next block's g and m, which its first pass reads */
            PREFETCH_R((const char *)g + (s + BLOCK + j) * (PK ? 2 : 4));
            if (!PK) PREFETCH_R((const char *)g + (s + BLOCK + j + 16) * 4);
            if (!(j & 32)) PREFETCH_W((char *)m + s + BLOCK + j);
            const __m512i blo = draw16(idx, kh), bhi = draw16(_mm512_add_epi32(idx, sixteen), kh);
            idx = _mm512_add_epi32(idx, _mm512_add_epi32(sixteen, sixteen));
            const __m512 mlo = _mm512_loadu_ps(mn + j), mhi = _mm512_loadu_ps(mn + j + 16);
            store_codes16(mq + j, mlo, vrecip, low16_16(blo));
            store_codes16(mq + j + 16, mhi, vrecip, low16_16(bhi));
            vec32_p(p, s + j, mlo, mhi, PK, RP, vd, va, blo, bhi);
        }
        for (; j < len16; j += 16) {
            /* the next block's g and m, which its first pass reads */
            PREFETCH_R((const char *)g + (s + BLOCK + j) * (PK ? 2 : 4));
            PREFETCH_W((char *)m + s + BLOCK + j);
            const __m512i bits = draw16(idx, kh);
            idx = _mm512_add_epi32(idx, sixteen);
            const __m512 mv = _mm512_loadu_ps(mn + j);
            store_codes16(mq + j, mv, vrecip, low16_16(bits));
            vec16_p(p, s + j, mv, PK, RP, vd, va, bits);
        }
    }
    codes_tail(p, m, s, j, len, mn, scale, PK, RP, d, a, key, kh0, base);
}

#endif

INLINE void block(void *p, const void *g, void *m, float *scales, int64_t s, int len, const int PK,
                  const int MK, int born, float b, float c, float d, float a, uint32_t key,
                  int64_t offset, const int RP) {
#if defined(SAI_AVX512) || defined(__AVX2__)
    /* the vector draws keep the index's high word constant over the block: a block whose
       element index crosses a multiple of 2^32 takes the scalar path */
    if ((uint64_t)(uint32_t)(offset + s) + (uint64_t)len <= 0x100000000ull) {
#ifdef SAI_AVX512
        block_avx512(p, g, m, scales, s, len, PK, MK, born, b, c, d, a, key, offset, RP);
#else
        block_avx2(p, g, m, scales, s, len, PK, MK, born, b, c, d, a, key, offset, RP);
#endif
        return;
    }
#endif
    float mn[BLOCK];
    const float old_scale = (MK == 2 && !born) ? scales[s / BLOCK] : 0.0f;
    block_tail(p, g, m, scales, s, len, 0, mn, PK, MK, born, b, c, d, a, key, offset, RP, old_scale);
}

/* Lanes of the vector path this build runs: 16 (AVX-512), 8 (AVX2), 1 (scalar). */
int sai_lowp_lanes(void) {
#if defined(SAI_AVX512)
    return 16;
#elif defined(__AVX2__)
    return 8;
#else
    return 1;
#endif
}

/* One piece of a batch (the row layout of _ROW in native_lowp.py): m' = b m + c g (born:
   c g), p' = d p + a m'. rounding: draw from the key of (seed, step, blk), offset the
   piece's first element's index in the original parameter (else key 0); round_p:
   stochastic rounding of a bfloat16 parameter (else nearest). */
typedef struct {
    void *p;
    const void *g;
    void *m;
    float *scales;
    int64_t n, offset;
    float b, c, d, a;
    uint32_t seed, step, blk;
    int32_t pk, mk, born, rounding, round_p;
} sai_piece;

int sai_lowp_row_bytes(void) { return (int)sizeof(sai_piece); }

/* Block k of piece q, its dtypes and rounding as compile-time constants of block(). */
static void piece_block(const sai_piece *q, uint32_t key, int64_t k) {
    const int64_t s = k * BLOCK;
    const int len = (int)((s + BLOCK < q->n ? s + BLOCK : q->n) - s);
#define RUN(PK, MK, RP) \
    block(q->p, q->g, q->m, q->scales, s, len, PK, MK, q->born, q->b, q->c, q->d, q->a, key, q->offset, RP)
#define BY_RP(PK, MK) do { if (q->round_p) RUN(PK, MK, 1); else RUN(PK, MK, 0); } while (0)
#define BY_MK(PK)                                              \
    do {                                                       \
        switch (q->mk) {                                       \
            case 0: BY_RP(PK, 0); break;                       \
            case 1: BY_RP(PK, 1); break;                       \
            case 2: BY_RP(PK, 2); break;                       \
            default: BY_RP(PK, -1); break;                     \
        }                                                      \
    } while (0)
    if (q->pk) BY_MK(1); else BY_MK(0);
#undef BY_MK
#undef BY_RP
#undef RUN
}

/* Every block of every piece in one parallel region: OpenMP splits the blocks of the whole
   batch, so small pieces cost no fork of their own. Returns 0, or -1 (nothing written) if
   the block index could not be allocated. */
int sai_lowp_pieces(const sai_piece *pc, int64_t count, int nthreads) {
    int64_t *first = malloc((size_t)(count + 1) * sizeof(int64_t)); /* first block of each piece */
    uint32_t *keys = malloc((size_t)(count > 0 ? count : 1) * sizeof(uint32_t));
    if (!first || !keys) {
        free(first);
        free(keys);
        return -1;
    }
    first[0] = 0;
    for (int64_t i = 0; i < count; i++) {
        first[i + 1] = first[i] + (pc[i].n + BLOCK - 1) / BLOCK;
        /* Rounding.key of sai_dist.momentum before its high word (seed, step, block mod 2^32) */
        keys[i] = pc[i].rounding ? mix(mix(mix(pc[i].seed) ^ pc[i].step) ^ pc[i].blk) : 0u;
    }
    const int64_t total = first[count];
#pragma omp parallel for schedule(static) num_threads(nthreads) if(total > 16)
    for (int64_t k = 0; k < total; k++) {
        int64_t lo = 0, hi = count - 1; /* the last piece whose first block is <= k */
        while (lo < hi) {
            const int64_t mid = (lo + hi + 1) / 2;
            if (first[mid] <= k) lo = mid;
            else hi = mid - 1;
        }
        piece_block(&pc[lo], keys[lo], k - first[lo]);
    }
    free(first);
    free(keys);
    return 0;
}
""".replace("SAI_BLOCK", str(BLOCK))

_reason: str | None = None
_M32 = 0xFFFFFFFF
_PK = {torch.float32: 0, torch.bfloat16: 1}
_PLAIN = (Tensor, torch.nn.Parameter)
_MK = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
#: One row of ``sai_piece`` (the C struct): p, g, m, scales, n, offset, b, c, d, a, seed,
#: step, block, pk, mk, born, rounding, round_p. Every field falls on its natural alignment,
#: so the packed little-endian layout is the C one (checked against ``sizeof`` at load).
_ROW = struct.Struct("<QQQQqqffffIIIiiiii")


def isa_flags(choice: str | None = None) -> tuple[str, ...]:
    """Compiler flags of the kernel build for this CPU: the widest vector build whose
    features ``/proc/cpuinfo`` lists, at most ``choice`` (default ``SAI_DIST_LOWP_SIMD``:
    ``avx512``/unset the widest, ``avx2``, ``0`` the portable scalar build, flags ``()``)."""
    choice = os.environ.get("SAI_DIST_LOWP_SIMD", "avx512") if choice is None else choice
    if choice == "0":
        return ()
    names = [name for name, _, _ in _BUILDS]
    if choice not in names:
        raise ValueError(f"SAI_DIST_LOWP_SIMD={choice!r}: must be one of {', '.join(names)} or 0")
    cpu = native.cpu_flags()
    for _, needs, flags in _BUILDS[names.index(choice) :]:
        if all(f in cpu for f in needs):
            return flags
    return ()


@functools.cache
def _load(isa: tuple[str, ...], source: str = _SOURCE, name: str = "sai_lowp") -> ctypes.CDLL | None:
    """The kernel of ``source`` (default this module's; another, e.g. an earlier revision's,
    for ``benchmarks/kernel_rate.py --against``) built for ``isa``; ``None`` when unavailable."""
    global _reason
    try:
        lib = native.load_c_library(name, source, libs=["-lm"], isa=isa)
    except native.KernelUnavailable as exc:
        _reason = f"the low-precision kernel: {exc}"
        return None
    lib.sai_lowp_pieces.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]  # rows, count, nthreads
    lib.sai_lowp_pieces.restype = ctypes.c_int
    for fn in ("sai_lowp_lanes", "sai_lowp_row_bytes"):
        getattr(lib, fn).argtypes = []
        getattr(lib, fn).restype = ctypes.c_int
    if lib.sai_lowp_row_bytes() != _ROW.size:  # the C struct and _ROW must agree field by field
        _reason = f"the low-precision kernel: its row is {lib.sai_lowp_row_bytes()} bytes, not {_ROW.size}"
        return None
    _reason = None
    return lib


@functools.cache
def _flags_for(choice: str | None) -> tuple[str, ...]:
    return isa_flags("avx512" if choice is None else choice)


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use for :func:`isa_flags`; ``None`` when
    unavailable."""
    return _load(_flags_for(os.environ.get("SAI_DIST_LOWP_SIMD")))


def lanes(lib: ctypes.CDLL | None = None) -> int:
    """Lanes of the vector path ``lib`` (default :func:`library`) runs: 16 (AVX-512F + BW),
    8 (AVX2), 1 (the scalar code alone); 0 when unavailable."""
    lib = library() if lib is None else lib
    return 0 if lib is None else int(lib.sai_lowp_lanes())


def supported(param: Tensor, grad: Tensor, buf: Tensor | None) -> bool:
    """Contiguous CPU tensors: parameter float32 or bfloat16 with a gradient of its dtype,
    buffer float32, bfloat16 or int8 (or none)."""
    # Called once per tensor per step: plain checks, no generators.
    if param.dtype not in _PK or grad.dtype != param.dtype or (buf is not None and buf.dtype not in _MK):
        return False
    shape = param.shape
    for t in (param, grad) if buf is None else (param, grad, buf):
        if type(t) not in _PLAIN or not t.is_cpu or not t.is_contiguous() or t.shape != shape:
            return False
    return True


# Where rounding to float32 overflows: halfway from the largest float32 to 2^128.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def _float32(x: float) -> float:
    """``x`` as a float32 coefficient: where rounding it to float32 overflows it is infinite
    (as a C ``float`` argument became), where ``struct.pack`` would raise."""
    return x if abs(x) < _FLOAT32_OVERFLOW or x != x else math.copysign(math.inf, x)


class Batch:
    """Pieces collected for one kernel call (one parallel region over all their blocks):
    :meth:`add` each piece, then :meth:`run`. Rows are packed as they come, so a step pays
    one ``struct.pack`` per piece and one ``ctypes`` call in all."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._rows = bytearray()
        self._count = 0
        self._written: list[Tensor] = []
        # Every tensor whose address is packed stays referenced until run(): a gradient
        # passed as a temporary would otherwise be freed and its memory reused first.
        self._alive: list[Tensor] = []

    def add(
        self,
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
        """One piece; ``coef = (b, c, d, a)`` as in :mod:`sai_dist.native`. Nothing is
        written before :meth:`run`."""
        n = param.numel()
        if n == 0:
            return
        b, c, d, a = coef
        # An overflowing coefficient is rare: the check per coefficient only then (an
        # overflow is the max of the four, or a NaN before it makes the compare fail).
        if not max(abs(b), abs(c), abs(d), abs(a)) < _FLOAT32_OVERFLOW:
            b, c, d, a = (_float32(x) for x in coef)
        self._rows += _ROW.pack(
            param.data_ptr(),
            grad.data_ptr(),
            0 if buf is None else buf.data_ptr(),
            0 if scales is None else scales.data_ptr(),
            n,
            0 if rounding is None else rounding.offset,
            b,
            c,
            d,
            a,
            0 if rounding is None else rounding.seed & _M32,
            0 if rounding is None else rounding.step & _M32,
            0 if rounding is None else rounding.block & _M32,
            _PK[param.dtype],
            -1 if buf is None else _MK[buf.dtype],
            int(born),
            int(rounding is not None),
            int(round_param and rounding is not None),
        )
        self._count += 1
        self._written.append(param)
        if buf is not None:
            self._written.append(buf)
        self._alive.append(grad)
        if scales is not None:
            self._written.append(scales)

    def run(self) -> None:
        """Step every piece added (in place), then forget them."""
        if not self._count:
            return
        rows = (ctypes.c_char * len(self._rows)).from_buffer(self._rows)
        if self._lib.sai_lowp_pieces(ctypes.addressof(rows), self._count, torch.get_num_threads()) != 0:
            raise MemoryError(f"the low-precision kernel could not index the blocks of {self._count} pieces")
        del rows  # release the bytearray's export before it is replaced
        torch.autograd.graph.increment_version(self._written)
        self._rows, self._count, self._written, self._alive = bytearray(), 0, [], []
