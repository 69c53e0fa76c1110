"""The dynamic int8 code map of ``benchmarks/int8_code_maps.py`` (issue 16 item 1's
measurement): its table against an independent numpy construction, its stochastic
rounding unbiased, its nearest rounding within half the local code gap, and the
measurement hook really routing SGD-SaI's int8 momentum through it and restoring the
library afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from sai_dist import SGDSaI
from sai_dist import functional as F
from sai_dist import momentum as lowp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import int8_code_maps as maps  # a benchmark script beside the others, not a package


def _numpy_table() -> np.ndarray:
    """The map built decade by decade (not from the bit layout): decade e holds
    2^(6-e) evenly spaced values in (10^-e-1, 10^-e], right end included; plus 0, signed."""
    mags = [0.0]
    for e in range(7):
        n = 2 ** (6 - e)
        lo, hi = 10.0 ** -(e + 1), 10.0**-e
        mags += list(lo + (hi - lo) * np.arange(1, n + 1) / n)
    mags = np.sort(np.array(mags))
    return np.concatenate([-mags[:0:-1], mags])


TABLE = _numpy_table()


def test_table_matches_an_independent_construction():
    assert TABLE.size == 255 and maps.TABLE.numel() == 255
    np.testing.assert_allclose(maps.TABLE.numpy(), TABLE.astype(np.float32), rtol=0, atol=0)
    assert (np.diff(TABLE) > 0).all() and TABLE[0] == -1 and TABLE[127] == 0 and TABLE[-1] == 1
    # dense near 0, sparse near 1: the gap below 1 is 0.9/64, the gap above 1e-6 is 4.5e-6
    np.testing.assert_allclose(TABLE[-1] - TABLE[-2], 0.9 / 64, rtol=1e-12)


def _local_gap(x: np.ndarray) -> np.ndarray:
    a = np.clip(np.searchsorted(TABLE, x, side="right") - 1, 0, TABLE.size - 2)
    return TABLE[a + 1] - TABLE[a], TABLE[a]


def test_stochastic_rounding_is_unbiased():
    # One block per probed value: element 0 is the block's absmax (1.0, so x = value), the
    # other 2047 are the value. 8 independent encodes (steps) per block: 16,376 draws each.
    values = np.array([0.73, -0.3141, 0.0567, -0.00891, 1.23e-3, 4.4e-5, -2.5e-6, 0.999])
    x = np.repeat(values, lowp.BLOCK).astype(np.float32)
    x[:: lowp.BLOCK] = 1.0
    xt = torch.from_numpy(x)
    codes = torch.empty(x.size, dtype=torch.int8)
    scales = torch.empty(values.size)
    total = torch.zeros(x.size, dtype=torch.float64)
    draws = 8
    for step in range(draws):
        maps.encode_dynamic(xt, codes, scales, lowp.Rounding(seed=3, step=step, block=0, offset=0))
        np.testing.assert_array_equal(scales.numpy(), 1.0)
        total += maps.decode_dynamic(codes, scales).double()
    mean = (total / draws).numpy().reshape(values.size, lowp.BLOCK)[:, 1:].mean(axis=1)
    v32 = values.astype(np.float32).astype(np.float64)
    gap, lo = _local_gap(v32)
    p = (v32 - lo) / gap
    n = draws * (lowp.BLOCK - 1)
    # Each decode is lo or lo + gap (Bernoulli(p) times gap): the mean's standard error is
    # gap sqrt(p(1-p)/n); allow 5 of them (plus float32 slack). A biased rounding (e.g. to
    # nearest, off by up to gap/2) fails by orders of magnitude more.
    bound = 5 * gap * np.sqrt(p * (1 - p) / n) + 1e-7 * np.abs(v32)
    assert (np.abs(mean - v32) <= bound).all(), (mean - v32, bound)
    assert (p > 0.01).all() and (p < 0.99).all()  # every probe really straddles two codes


def test_nearest_rounding_within_half_the_local_gap():
    g = torch.Generator().manual_seed(0)
    # Magnitudes over 8 decades (below 1e-6 too) and a short last block.
    v = torch.randn(3 * lowp.BLOCK + 100, generator=g) * 10.0 ** -(
        torch.rand(3 * lowp.BLOCK + 100, generator=g) * 8
    )
    codes = torch.empty(v.numel(), dtype=torch.int8)
    scales = torch.empty(4)
    maps.encode_dynamic(v, codes, scales, None)
    vn = v.double().numpy()
    absmax = np.array([np.abs(b).max() for b in np.array_split(vn, [2048, 4096, 6144])])
    np.testing.assert_allclose(scales.numpy(), absmax, rtol=1e-7)
    x = vn / np.repeat(absmax, [2048, 2048, 2048, 100])
    got = maps.decode_dynamic(codes, scales).double().numpy() / np.repeat(absmax, [2048, 2048, 2048, 100])
    gap, _ = _local_gap(x)
    err = np.abs(got - x)
    assert (err <= gap / 2 + 1e-6 * gap + 1e-7).all()
    # and it is the nearest table value (up to float32 ties)
    nearest = np.abs(TABLE[None, :] - x[:, None]).min(axis=1)
    np.testing.assert_allclose(err, nearest, atol=1e-6)


def test_hook_routes_int8_momentum_and_restores_the_library():
    before = (lowp.encode, lowp.decode, F.encode, F.decode)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 80))  # 5120 elements >= SMALL: int8 momentum
    opt = SGDSaI([w], lr=0.1, momentum_dtype="int8", fused=False)
    w.grad = torch.randn(64, 80)
    with maps.dynamic_int8():
        assert lowp.encode is not before[0] and F.decode is not before[3]
        opt.step()
    assert (lowp.encode, lowp.decode, F.encode, F.decode) == before
    st = opt.state[w]
    codes, scales = st["momentum_buffer"], st["momentum_scale"]
    g = w.grad.reshape(-1).double().numpy()
    blocks = np.split(g, [2048, 4096])
    # The first step stores m = g: dynamic scales are the block absmax (the linear map's
    # would be absmax / 127), and the codes decode to g within one local gap.
    np.testing.assert_allclose(scales.numpy(), [np.abs(b).max() for b in blocks], rtol=1e-7)
    per = np.repeat(scales.double().numpy(), [2048, 2048, 1024])
    x = g / per
    got = maps.decode_dynamic(codes, scales).reshape(-1).double().numpy() / per
    gap, _ = _local_gap(x)
    assert (np.abs(got - x) <= gap * (1 + 1e-6) + 1e-7).all()
