"""The low-precision CPU kernel (:mod:`sai_dist.native_lowp`) against the torch reference
(:func:`sai_dist.functional._low_precision_sgd_sai` with ``fused=False``), bit for bit.

Both compute every product rounded once and ``add(alpha=)`` as one fused multiply-add, and
draw the same counter-based bits, so any difference is a bug: the assertions are
``torch.equal``. Covered: every parameter dtype x momentum dtype, piece lengths that are not
a multiple of the AVX2 width (8) or of the block (2048), shorter than a block or than the
width, fresh (uninitialised) buffers, maximize, bf16 parameters with and without stochastic
rounding, element origins next to 2^32 (a block whose index crosses it takes the scalar
path), the small-tensor rule through the optimizer, and every build (AVX-512, AVX2, scalar)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sai_dist import SGDSaI, native, native_lowp
from sai_dist import momentum as lowp
from sai_dist.functional import _low_precision_sgd_sai
from tests.support import lowp_reference as ref
from tests.support.lowp_pieces import fresh_piece

pytestmark = pytest.mark.skipif(
    native_lowp.library() is None, reason=f"no native low-precision kernel: {native_lowp._reason}"
)

PARAM_DTYPES = [torch.float32, torch.bfloat16]
BUF_DTYPES = [torch.float32, torch.bfloat16, torch.int8, None]
# 37: under one vector of 8 and not a multiple of it; 2048: one whole block; 2053 and 5000:
# whole blocks and a short one whose length is not a multiple of 8; 4104: a short block of 8k.
LENGTHS = [37, 2048, 2053, 4104, 5000]
# Origins of the piece's first element in the original parameter: small; a block that
# crosses 2^32 (the vector hash keeps the high word constant over a block, so that block is
# stepped by the scalar code); just past 2^32 (high word 1 in the vector hash).
OFFSETS = [100, 2**32 - 3000, 2**32 + 5]


def _steps(fused, n, param_dtype, buf_dtype, *, offset, maximize, round_params, steps=3):
    """``steps`` updates of one piece through ``_low_precision_sgd_sai``; the first one
    with a fresh buffer holding garbage (NaN, random codes and NaN scales): a born buffer
    must not be read."""
    gen = torch.Generator().manual_seed(n + offset % 997)
    p, buf, sc = fresh_piece(n, param_dtype, buf_dtype, gen)
    for t in range(steps):
        # A gradient scale that changes over the steps (the int8 scales move both ways).
        g = (torch.randn(n, generator=gen) * 10.0 ** (-1 - t % 2)).to(param_dtype)
        _low_precision_sgd_sai(
            [p],
            [g],
            [buf],
            [sc],
            [0.8],
            [t == 0],
            [lowp.Rounding(7, t, 3, offset)],
            lr=0.3,
            momentum=0.0 if buf is None else 0.9,
            weight_decay=0.01,
            maximize=maximize,
            round_params=round_params,
            fused=fused,
        )
    return p, buf, sc


def _assert_same(kernel, reference):
    for k, r in zip(kernel, reference, strict=True):
        if r is None:
            assert k is None
            continue
        assert k.dtype == r.dtype
        if not torch.equal(k, r):
            diff = (k.float() != r.float()).nonzero().flatten()
            first = diff[:5].tolist()
            raise AssertionError(f"{diff.numel()} of {r.numel()} elements differ, first at {first}")


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("buf_dtype", BUF_DTYPES, ids=str)
def test_kernel_equals_reference_bit_for_bit(param_dtype, buf_dtype):
    for n in LENGTHS:
        for offset in OFFSETS:
            for maximize, round_params in [(False, True), (True, False)]:
                kw = dict(offset=offset, maximize=maximize, round_params=round_params)
                kernel = _steps(None, n, param_dtype, buf_dtype, **kw)
                _assert_same(kernel, _steps(False, n, param_dtype, buf_dtype, **kw))


def test_one_batch_of_mixed_pieces_equals_the_reference():
    """One kernel call steps many pieces at once (one OpenMP loop over all their blocks):
    pieces of both parameter dtypes and every buffer dtype, born and not, lengths with short
    blocks in the middle of the batch, float32 state without rounding keys, stepped together
    for 3 steps on 2 threads, equal the reference bit for bit piece by piece."""
    specs = [  # (n, param dtype, buffer dtype, origin offset)
        (5000, torch.float32, torch.int8, 0),
        (37, torch.bfloat16, torch.bfloat16, 2**32 - 3000),
        (4104, torch.bfloat16, torch.int8, 2**32 + 5),
        (2053, torch.float32, torch.bfloat16, 100),
        (6000, torch.float32, torch.float32, 0),
        (2048 * 20 + 9, torch.bfloat16, torch.int8, 7),
    ]

    def run(fused):
        gen = torch.Generator().manual_seed(3)
        ps = [torch.randn(n, generator=gen).to(pd) for n, pd, _, _ in specs]
        bufs = [torch.empty(n, dtype=bd) for n, _, bd, _ in specs]
        scs = [torch.empty(lowp.num_scales([n])) if bd == torch.int8 else None for n, _, bd, _ in specs]
        for t in range(3):
            gs = [(torch.randn(n, generator=gen) * 10.0 ** (-t)).to(pd) for n, pd, _, _ in specs]
            born = [t == 0 or (t == 1 and k % 2 == 0) for k in range(len(specs))]  # some reborn at step 1
            keys = [
                None if bd == torch.float32 else lowp.Rounding(7, t, k, off)
                for k, (_, _, bd, off) in enumerate(specs)
            ]
            _low_precision_sgd_sai(
                ps,
                gs,
                bufs,
                scs,
                [0.5 + 0.1 * k for k in range(len(specs))],
                born,
                keys,
                lr=0.3,
                momentum=0.9,
                weight_decay=0.01,
                maximize=False,
                round_params=True,
                fused=fused,
            )
        return ps, bufs, scs

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernel = run(None)
    finally:
        torch.set_num_threads(threads)
    reference = run(False)
    for k in range(len(specs)):
        _assert_same(
            [kernel[0][k], kernel[1][k], kernel[2][k]], [reference[0][k], reference[1][k], reference[2][k]]
        )


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_threads_split_blocks_without_changing_a_bit(param_dtype):
    """With 2 threads (OpenMP splits the blocks) the kernel gives the single-threaded
    reference's bits."""
    n = 41 * 2048 + 77  # enough blocks for the parallel region (more than 16)
    for buf_dtype in (torch.int8, torch.bfloat16):
        kw = dict(offset=2**32 + 5, maximize=False, round_params=True)
        reference = _steps(False, n, param_dtype, buf_dtype, **kw)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            kernel = _steps(None, n, param_dtype, buf_dtype, **kw)
        finally:
            torch.set_num_threads(threads)
        _assert_same(kernel, reference)


def test_kernel_writes_the_documented_int8_codes_and_bf16_rounding():
    """Independent of the reference's code: a born int8 buffer holds floor(v * (1 / s) + u) with
    s = absmax / 127 per block and u from the documented bits; a bf16 parameter rounded
    stochastically is one of the two bf16 neighbours of the float32 update."""
    n = 4100
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(n, generator=gen)
    p = torch.zeros(n, dtype=torch.bfloat16)
    buf = torch.empty(n, dtype=torch.int8)
    sc = torch.empty(lowp.num_scales([n]))
    key = lowp.Rounding(1, 0, 0, 2**32 - 1000)
    batch = native_lowp.Batch(native_lowp.library())
    # g.bfloat16() is a temporary: the batch must keep it alive until run() (it did not,
    # once, and read freed memory)
    batch.add(p, g.bfloat16(), buf, sc, born=True, coef=(0.0, 1.0, 1.0, -0.5), rounding=key, round_param=True)
    batch.run()
    v = g.bfloat16().float()
    for k in range(3):
        block = v[k * 2048 : (k + 1) * 2048]
        assert float(sc[k]) == float(block.abs().max() / 127)
    bits = key.bits(lowp.STREAM_MOMENTUM, 0, n, torch.device("cpu"))
    u = bits.double() / 2**16
    per = sc.repeat_interleave(2048)[:n].double()
    expect = torch.floor(v.double() / per + u).clamp(-127, 127)
    # float64 v / s against the kernel's float32 v * (1 / s): equal unless v / s + u sits
    # within two float32 roundings of an integer.
    assert float((buf.double() == expect).double().mean()) > 0.999
    assert int((buf.double() - expect).abs().max()) <= 1
    exact = -0.5 * v
    lo = exact.bfloat16().float()
    assert torch.all((p.float() - exact).abs() <= (exact.abs() * 2**-7 + 1e-30))
    assert torch.all((p.float() == lo) | ((p.float() - lo).abs() <= lo.abs() * 2**-7 * 1.01))


def test_small_tensor_rule_through_the_optimizer_is_bit_identical():
    """Under int8 momentum a parameter below lowp.SMALL keeps float32 momentum: with bf16
    parameters both kinds go through the kernel, and the whole trajectory equals the
    reference's; with float32 parameters the large tensors do (the small one is plain
    float32 state, the other native kernel's)."""
    shapes = [(70, 80), (40,), (3, 1500)]  # 5600 (int8, a short block), 40 (< SMALL), 4500

    def run(fused, dtype, stochastic):
        gen = torch.Generator().manual_seed(11)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        opt = SGDSaI(
            params,
            lr=0.05,
            momentum=0.9,
            weight_decay=0.01,
            momentum_dtype="int8",
            stochastic_rounding=stochastic,
            seed=9,
            fused=fused,
        )
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return params, opt

    for dtype, stochastic in [(torch.bfloat16, None), (torch.bfloat16, False), (torch.float32, None)]:
        (kp, kopt), (rp, ropt) = run(None, dtype, stochastic), run(False, dtype, stochastic)
        for i, (a, b) in enumerate(zip(kp, rp, strict=True)):
            ka, rb = kopt.state[a]["momentum_buffer"], ropt.state[b]["momentum_buffer"]
            small = a.numel() < lowp.SMALL
            assert ka.dtype == rb.dtype == (torch.float32 if small else torch.int8)
            if small and dtype == torch.float32:
                continue  # not a low-precision tensor: stepped by sai_dist.native, not this kernel
            assert torch.equal(a, b), (dtype, stochastic, i)
            assert torch.equal(ka, rb), (dtype, stochastic, i)


@pytest.mark.parametrize("choice", ["0", "avx2", "avx512"])
def test_every_build_equals_reference(monkeypatch, choice):
    """Each build this CPU can run gives the same bits: ``SAI_DIST_LOWP_SIMD=0`` the
    portable scalar code alone (no -mavx2; fmaf for the fused multiply-adds), ``avx2`` the
    8-lane path, ``avx512`` the 16-lane one (the default where the CPU has it)."""
    cpu = native.cpu_flags()
    want = {"0": 1, "avx2": 8 if {"avx2", "fma"} <= cpu else 1}
    want["avx512"] = 16 if {"avx2", "fma", "avx512f", "avx512bw"} <= cpu else want["avx2"]
    monkeypatch.setenv("SAI_DIST_LOWP_SIMD", choice)
    assert native_lowp.library() is not None, native_lowp._reason
    assert native_lowp.lanes() == want[choice]
    # 37 = one 32-element vector step + a scalar tail; 53 adds a 16-element step between
    # them (AVX-512 steps two vectors at a time, then one, then scalars)
    cases = [(37, 100, True), (53, 7, False), (5000, 2**32 - 3000, True), (4104, 2**32 + 5, False)]
    for param_dtype in PARAM_DTYPES:
        for buf_dtype in BUF_DTYPES:
            for n, offset, round_params in cases:
                kw = dict(offset=offset, maximize=True, round_params=round_params)
                kernel = _steps(None, n, param_dtype, buf_dtype, **kw)
                _assert_same(kernel, _steps(False, n, param_dtype, buf_dtype, **kw))


def _born_int8(g, fused):
    """One born step of a float32 parameter with int8 momentum (m = g) through the kernel
    (``fused=None``) or the reference (``False``): ``(param, codes, scales)``."""
    n = g.numel()
    p, buf, sc = torch.zeros(n), torch.empty(n, dtype=torch.int8), torch.empty(lowp.num_scales([n]))
    _low_precision_sgd_sai(
        [p],
        [g.clone()],
        [buf],
        [sc],
        [1.0],
        [True],
        [lowp.Rounding(3, 0, 0, 0)],
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        maximize=False,
        round_params=True,
        fused=fused,
    )
    return p, buf, sc


@pytest.mark.parametrize("choice", ["0", "avx2", "avx512"])
def test_tiny_block_divides_where_the_reciprocal_overflows(monkeypatch, choice):
    """Codes are v * (1 / s) + u; in a block of tiny momentum (s < 2^-128) 1 / s overflows float32,
    and that block divides instead. Every build equals the reference there, and the codes
    stay within one step of the value (the reciprocal's inf would have made them +-127)."""
    monkeypatch.setenv("SAI_DIST_LOWP_SIMD", choice)
    n = 3 * 2048
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(n, generator=gen)
    g[2048:4096] *= 1e-40  # block 1: absmax ~ 4e-40, s ~ 3e-42, 1 / s > 3.4e38
    scales_of = [float(g[k * 2048 : (k + 1) * 2048].abs().max() / 127) for k in range(3)]
    assert torch.isinf(torch.tensor(scales_of[1]).reciprocal()) and scales_of[1] > 0
    results = [_born_int8(g, fused) for fused in (None, False)]
    _assert_same(results[0], results[1])
    back = lowp.decode(results[0][1], results[0][2])
    step = results[0][2].repeat_interleave(2048)[:n]
    assert torch.all((back - g).abs() <= step * (1 + 1e-6))  # born: m = g
    assert (
        int(results[0][1][2048:4096].abs().max()) == 127
        and int((results[0][1][2048:4096] == 127).sum()) < 2048
    )


@pytest.mark.parametrize("choice", ["0", "avx2", "avx512"])
def test_non_finite_momentum_is_encoded_as_the_reference_does(monkeypatch, choice):
    """A NaN in a block is skipped by its absmax (its code is 0, the block's other codes
    keep their values); an infinity makes the block's scale infinite (finite values code
    0). Every build equals the torch reference and the numpy one."""
    monkeypatch.setenv("SAI_DIST_LOWP_SIMD", choice)
    n = 3 * 2048 + 100
    g = torch.randn(n, generator=torch.Generator().manual_seed(4))
    g[5], g[2048 + 7], g[6200] = float("nan"), float("inf"), float("nan")  # blocks 0, 1, short 3
    results = [_born_int8(g, fused) for fused in (None, False)]
    (kp, kb, ks), (rp, rb, rs) = results
    assert torch.equal(kb, rb) and torch.equal(ks, rs)
    torch.testing.assert_close(kp, rp, rtol=0, atol=0, equal_nan=True)
    finite = torch.where(torch.isnan(g), 0.0, g)
    assert float(ks[0]) == float(finite[:2048].abs().max() / 127) and math.isinf(float(ks[1]))
    assert int(kb[5]) == 0 and int(kb[6200]) == 0 and int(kb[:2048].abs().max()) == 127
    assert int(kb[2048:4096].abs().max()) == 0  # block 1: scale inf, every code 0
    codes, scales = ref.quantize(g.numpy(), ref.bits(3, "momentum", 0, 0, np.arange(n, dtype=np.uint64)))
    np.testing.assert_array_equal(kb.numpy(), codes)
    np.testing.assert_array_equal(ks.numpy(), scales)


def test_unknown_simd_choice_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("SAI_DIST_LOWP_SIMD", "sse9")
    with pytest.raises(ValueError, match="SAI_DIST_LOWP_SIMD='sse9'"):
        native_lowp.library()
