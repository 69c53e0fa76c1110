r"""A dynamic (non-linear) signed int8 code map for SGD-SaI's int8 momentum, for measurement.

The library (:mod:`sai_dist.momentum`) stores int8 momentum with a *linear* absmax map:
:math:`m = q\,s`, :math:`s = \max|m| / 127`, :math:`q \in [-127, 127]`, so every code is
the same distance :math:`s` from its neighbours. Most elements of a block are much smaller
than its largest, and there a linear map has few codes. A *dynamic* map, in the spirit of
the ones bitsandbytes and torchao use for 8-bit Adam states (written here from the idea,
not from their code), spends its codes like a floating-point format: a sign, an exponent
given by leading zeros, then a linear fraction, so it is dense near 0 and sparse near 1.

**The map.** A magnitude code :math:`k \in \{0, \dots, 127\}` (7 bits,
:math:`b_6 \dots b_0`). :math:`k = 0` is the value 0. For :math:`k \ge 1`, let :math:`e`
be the number of leading zero bits of :math:`k` in 7 bits (:math:`0 \le e \le 6`); the
bit after them is 1 (the marker), and the :math:`F = 6 - e` bits below the marker are an
unsigned integer :math:`j \in [0, 2^F)`. The magnitude is

.. math::

    v(k) = 10^{-e} \left(0.1 + 0.9\,\frac{j + 1}{2^F}\right)
    \in \left(10^{-e-1},\ 10^{-e}\right],

so the decade :math:`(10^{-e-1}, 10^{-e}]` holds :math:`2^{6-e}` evenly spaced values
(64 in :math:`(0.1, 1]`, 32 in :math:`(0.01, 0.1]`, ..., 1 at :math:`10^{-6}`); the
largest magnitude is exactly 1 (:math:`e = 0, j = 63`), the smallest non-zero
:math:`10^{-6}`. The 128 magnitudes are distinct, and the decades do not overlap, so with
signs the map has :math:`2 \cdot 127 + 1 = 255` distinct values in :math:`[-1, 1]`:
:data:`TABLE`, sorted ascending, :math:`T_0 = -1 < \dots < T_{127} = 0 < \dots < T_{254} = 1`,
symmetric (:math:`T_{127 + i} = -T_{127 - i}`). The stored int8 code of a value is its
index in that sorted table minus 127, :math:`c \in [-127, 127]` (sign of the code = sign of
the value, 0 is 0), and a block's float32 scale is its absmax
:math:`s_k = \max_{i \in k}|m_i|` (not divided by 127). Decoding: :math:`m_i = T_{c_i + 127}\, s_k`.

**Encoding** :math:`x = m_i / s_k \in [-1, 1]` (0 when :math:`s_k = 0`). Let
:math:`T_a \le x \le T_{a+1}` be its two neighbouring table values (:math:`a` the largest
index with :math:`T_a \le x`, capped at 253). *Stochastic* (the default):
:math:`c = a + 1` with probability :math:`p = (x - T_a)/(T_{a+1} - T_a)`, else :math:`a`,
decided by :math:`u < p` with the library's counter-based uniform draws
(:meth:`sai_dist.momentum.Rounding.bits`, :func:`sai_dist.momentum._uniform`; the same
bits the linear map draws for the same element), so :math:`E[T_c] = x`: unbiased, like
the linear map's :math:`\lfloor x/s + u \rfloor`. *Nearest* (``rounding=None``, as the
library rounds on checkpoint conversion): the closer of the two, ties to :math:`T_a`;
error at most half the local gap :math:`(T_{a+1} - T_a)/2`.

Bytes are those of the linear map: one int8 code per element and one float32 scale per
:data:`sai_dist.momentum.BLOCK` elements; the small-tensor rule is the library's.

:func:`dynamic_int8` swaps the library's int8 encode/decode for this codec within a
``with`` block. It is a **measurement hook** for ``benchmarks/convergence_lowp.py``
(variant ``int8_dynamic_momentum``), not a library feature: it patches module attributes,
covers only the torch reference path (the native and compiled kernels implement the
linear map only, so run the optimizer with ``fused=False``), and leaves checkpoints
unaware of the map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from sai_dist import functional as _functional
from sai_dist import momentum as _momentum
from sai_dist.momentum import BLOCK, STREAM_MOMENTUM, Rounding, _uniform

__all__ = ["TABLE", "decode_dynamic", "dynamic_int8", "encode_dynamic", "magnitudes"]

_CHUNK = 1 << 20  # a multiple of BLOCK: chunks hold whole blocks


def magnitudes() -> np.ndarray:
    """The 128 magnitudes :math:`v(k)`, indexed by the magnitude code :math:`k` (float64)."""
    out = np.zeros(128)
    for k in range(1, 128):
        e = 7 - k.bit_length()  # leading zeros in 7 bits
        f = 6 - e  # fraction bits below the marker
        j = k - (1 << f)  # the bits below the marker
        out[k] = 10.0**-e * (0.1 + 0.9 * (j + 1) / 2**f)
    return out


def _table() -> Tensor:
    mags = np.sort(magnitudes())  # 0 first
    signed = np.concatenate([-mags[:0:-1], mags])  # -1 .. 0 .. 1, 255 values
    return torch.tensor(signed, dtype=torch.float32)


#: The 255 code values, ascending; code ``c`` decodes to ``TABLE[c + 127]`` times the scale.
TABLE = _table()


def _block_absmax(x: Tensor) -> Tensor:
    n = x.numel()
    full = n // BLOCK * BLOCK
    parts = []
    if full:
        parts.append(x[:full].view(-1, BLOCK).abs().amax(dim=1))
    if full < n:
        parts.append(x[full:].abs().amax().reshape(1))
    return torch.cat(parts) if parts else x.new_zeros(0)


def _per_element(scales: Tensor, n: int) -> Tensor:
    return scales.repeat_interleave(BLOCK)[:n]


def decode_dynamic(buf: Tensor, scales: Tensor) -> Tensor:
    """float32 value of int8 dynamic codes ``buf`` with their block absmax ``scales``."""
    flat = buf.reshape(-1).to(torch.int64).add_(127)
    table = TABLE.to(buf.device)
    return table[flat].mul_(_per_element(scales, flat.numel())).view(buf.shape)


def encode_dynamic(
    value: Tensor,
    buf: Tensor,
    scales: Tensor,
    rounding: Rounding | None,
    *,
    stream: int = STREAM_MOMENTUM,
) -> None:
    """Store float32 ``value`` as dynamic codes in int8 ``buf`` and block absmax in
    ``scales`` (both written in place): stochastically rounded between the two neighbouring
    code values with ``rounding``'s draws, to nearest when ``rounding`` is ``None``."""
    flat_v, flat_b = value.reshape(-1).to(torch.float32), buf.view(-1)
    n = flat_v.numel()
    scales.copy_(_block_absmax(flat_v))
    table = TABLE.to(value.device)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        per = _per_element(scales[lo // BLOCK : (hi + BLOCK - 1) // BLOCK], hi - lo)
        x = torch.where(per > 0, flat_v[lo:hi] / per, 0.0).clamp_(-1.0, 1.0)
        a = (torch.searchsorted(table, x, right=True) - 1).clamp_(0, table.numel() - 2)
        t_lo, t_hi = table[a], table[a + 1]
        frac = (x - t_lo) / (t_hi - t_lo)
        if rounding is None:
            up = frac > 0.5
        else:
            up = _uniform(rounding.bits(stream, lo, hi - lo, value.device)) < frac
        flat_b[lo:hi] = (a + up.to(torch.int64) - 127).to(torch.int8)


@contextlib.contextmanager
def dynamic_int8() -> Iterator[None]:
    """Within the block, every int8 encode/decode of the torch reference path uses the
    dynamic map (other dtypes go to the library's functions); restored on exit."""
    originals = {
        (mod, name): getattr(mod, name) for mod in (_momentum, _functional) for name in ("encode", "decode")
    }
    lib_encode, lib_decode = _momentum.encode, _momentum.decode

    def encode(
        value: Tensor,
        buf: Tensor,
        scales: Tensor | None,
        rounding: Rounding | None,
        *,
        stream: int = STREAM_MOMENTUM,
    ) -> None:
        if buf.dtype == torch.int8:
            assert scales is not None
            encode_dynamic(value, buf, scales, rounding, stream=stream)
            return
        lib_encode(value, buf, scales, rounding, stream=stream)

    def decode(buf: Tensor, scales: Tensor | None) -> Tensor:
        if buf.dtype == torch.int8:
            assert scales is not None
            return decode_dynamic(buf, scales)
        return lib_decode(buf, scales)

    try:
        for mod, name in originals:
            setattr(mod, name, encode if name == "encode" else decode)
        yield
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
