"""An independent numpy reference of SGD-SaI with low-precision storage, for the tests.

It follows the documented formulas of ``sai_dist.momentum`` (the counter-based hash, one draw
per element whose high 16 bits round the parameter and low 16 the momentum, bf16
stochastic rounding by adding 16 random bits to the float32 pattern and truncating, int8
block-wise absmax codes with ``q = floor(m * (1 / s) + u)``) in numpy's wrapping ``uint64``
arithmetic, one parameter at a time, and shares no code with ``sai_dist``. g-SNR follows
the plain formula (norm over std, normalised by the model's max) in float64.
"""

from __future__ import annotations

import numpy as np
import torch

M32 = np.uint64(0xFFFFFFFF)
BLOCK = 2048
SMALL = 4096


def mix(x):
    x = np.asarray(x, dtype=np.uint64) & M32
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x5BD1E995)) & M32
    return x ^ (x >> np.uint64(16))


def key(seed, step, block, high=0):
    k = mix(mix(mix(seed) ^ np.uint64(step & 0xFFFFFFFF)) ^ np.uint64(block))
    return mix(k ^ np.asarray(high, dtype=np.uint64))


def draw(seed, step, block, index):
    """The element's 32-bit draw."""
    index = np.asarray(index, dtype=np.uint64)
    return mix(key(seed, step, block, index >> np.uint64(32)) ^ (index & M32))


def bits(seed, stream, step, block, index):
    """16 bits of the element's draw: stream "param" the high half, "momentum" the low."""
    shift = {"param": 16, "momentum": 0}[stream]
    return (draw(seed, step, block, index) >> np.uint64(shift)) & np.uint64(0xFFFF)


def sr_bf16(x32, b):
    """float32 array -> float32 array of bf16 values, rounded stochastically with 16 bits."""
    u = x32.view(np.uint32).astype(np.uint64)
    r = (u + b) & np.uint64(0xFFFF0000)
    return r.astype(np.uint32).view(np.float32)


def uniform(b):
    return b.astype(np.float32) * np.float32(2.0**-16)


def _scaled(m32):
    """``(m * (1 / s), s)``: a 1-D float32 array times the reciprocals of its per-block
    absmax/127 scales (0 where a block is all zeros), and the scales."""
    n = m32.size
    scales = np.array(
        # NaN skipped, as if 0 (the documented absmax)
        [
            np.where(np.isnan(m32[i : i + BLOCK]), 0, np.abs(m32[i : i + BLOCK])).max() / np.float32(127)
            for i in range(0, n, BLOCK)
        ],
        dtype=np.float32,
    )
    per = np.repeat(scales, BLOCK)[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        recip = np.where(per > 0, np.float32(1) / per, np.float32(0)).astype(np.float32)
        # multiply by the rounded reciprocal; divide where it overflows (s < 2^-128)
        q = np.where(np.isinf(recip), m32 / per, m32 * recip)
        q = np.where(per > 0, q, np.float32(0)).astype(np.float32)
    return q, scales


def quantize(m32, b):
    """int8 codes and per-block scales of a 1-D float32 array."""
    q, scales = _scaled(m32)
    q = np.floor(q + uniform(b))
    return np.nan_to_num(np.clip(q, -127, 127), nan=0).astype(np.int8), scales


def dequantize(codes, scales):
    return codes.astype(np.float32) * np.repeat(scales, BLOCK)[: codes.size]


class ReferenceLowPrecision:
    """``momentum_dtype`` in {"bfloat16", "int8"}; parameters float32 or bfloat16 (rounded
    stochastically). One param group, the model's parameters in order (block = position)."""

    def __init__(self, params, *, lr, momentum, weight_decay, eps=1e-8, momentum_dtype, seed=0):
        self.params = list(params)
        self.lr, self.beta, self.wd, self.eps = lr, momentum, weight_decay, eps
        self.dtype, self.seed = momentum_dtype, seed
        self.scale = None
        self.state = {}  # block -> (kind, codes/values, scales)
        self.steps = 0

    def _gsnr(self, g):
        g = g.double()
        return float(torch.linalg.norm(g) / (torch.std(g) + self.eps))

    @torch.no_grad()
    def step(self):
        if self.scale is None:
            values = [self._gsnr(p.grad) for p in self.params]
            top = max(values)
            self.scale = [np.float32(v / top) for v in values]
        t = self.steps
        for blk, p in enumerate(self.params):
            n = p.numel()
            idx = np.arange(n, dtype=np.uint64)
            g = p.grad.detach().float().reshape(-1).numpy().copy()
            kind = "fp32" if (self.dtype == "int8" and n < SMALL) else self.dtype
            if blk not in self.state:
                m = g
            else:
                _, stored, sc = self.state[blk]
                old = dequantize(stored, sc) if kind == "int8" else stored
                m = np.float32(self.beta) * old + np.float32(1 - self.beta) * g
            bm = bits(self.seed, "momentum", t, blk, idx)
            if kind == "bfloat16":
                self.state[blk] = (kind, sr_bf16(m.astype(np.float32), bm), None)
            elif kind == "int8":
                self.state[blk] = (kind, *quantize(m.astype(np.float32), bm))
            else:
                self.state[blk] = (kind, m.astype(np.float32), None)
            p32 = p.detach().float().reshape(-1).numpy().copy()
            p32 = p32 * np.float32(1 - self.lr * self.wd)
            p32 = p32 + np.float32(-self.lr * self.scale[blk]) * m.astype(np.float32)
            if p.dtype == torch.bfloat16:
                p32 = sr_bf16(p32.astype(np.float32), bits(self.seed, "param", t, blk, idx))
            p.copy_(torch.from_numpy(p32.astype(np.float32)).reshape(p.shape).to(p.dtype))
        self.steps += 1

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def quantize_nearest(m32):
    """int8 codes and per-block scales of a 1-D float32 array, codes rounded to nearest
    (half to even): what a checkpoint load re-encodes into new blocks."""
    q, scales = _scaled(m32)
    return np.clip(np.round(q), -127, 127).astype(np.int8), scales
