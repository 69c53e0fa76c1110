"""The compiled low-precision kernel (:mod:`sai_dist.compiled_lowp`) against the torch
reference (:func:`sai_dist.functional._low_precision_sgd_sai` with ``fused=False``), bit
for bit.

The kernel is selected for CUDA tensors; inductor compiles the same graph to C++ for CPU
tensors, so on this machine the tests drive :class:`compiled_lowp.Batch` directly with CPU
tensors: the graph, its fused multiply-adds, its random bits and its int8 row reductions
are the ones Triton gets. Every assertion is ``torch.equal``. The GPU tests run the
optimizer's own routing on CUDA (``fused=None`` against ``fused=False``)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from torch._inductor.utils import run_and_get_code

from sai_dist import SGDSaI, compiled_lowp, functional
from sai_dist import momentum as lowp
from sai_dist.functional import _coefficients, _low_precision_sgd_sai
from sai_dist.in_backward import InBackwardSGDSaI
from tests.support import lowp_reference as ref
from tests.support.lowp_pieces import fresh_piece

pytestmark = pytest.mark.skipif(
    compiled_lowp.failure("cpu") is not None,
    reason=f"torch.compile unavailable: {compiled_lowp.failure('cpu')}",
)

PARAM_DTYPES = [torch.float32, torch.bfloat16]
BUF_DTYPES = [torch.float32, torch.bfloat16, torch.int8, None]
HYPER = dict(lr=0.3, weight_decay=0.01)


def _step(kernel, ps, gs, bufs, scs, scales, born, keys, *, momentum, maximize, round_params, weight_decay):
    """One step of every piece: ``kernel`` True, through the compiled kernel's Batch
    directly; else through ``_low_precision_sgd_sai(fused=kernel)`` (False: the
    reference; None: its routing)."""
    hyper = dict(lr=HYPER["lr"], momentum=momentum, weight_decay=weight_decay, maximize=maximize)
    if kernel is not True:
        _low_precision_sgd_sai(
            ps, gs, bufs, scs, scales, born, keys, **hyper, round_params=round_params, fused=kernel
        )
        return
    batch = compiled_lowp.Batch()
    for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
        buf = bufs[i] if momentum != 0 else None
        assert compiled_lowp.supported(p, g, buf, keys[i])
        _, coef = _coefficients(scales[i], born[i], **hyper)
        batch.add(p, g, buf, scs[i], born=born[i], coef=coef, rounding=keys[i], round_param=round_params)
    assert batch.run() == []  # every piece stepped by the kernel


def _steps(
    kernel,
    n,
    param_dtype,
    buf_dtype,
    *,
    offset,
    maximize=False,
    round_params=True,
    grad_dtype=None,
    keyed=True,
    weight_decay=0.01,
    steps=3,
    device="cpu",
):
    """``steps`` updates of one piece; the first with a fresh buffer holding garbage (a
    born buffer must not be read), the gradient's scale changing over the steps."""
    gen = torch.Generator().manual_seed(n + offset % 997)
    p, buf, sc = fresh_piece(n, param_dtype, buf_dtype, gen)
    p, buf, sc = (None if t is None else t.to(device) for t in (p, buf, sc))
    for t in range(steps):
        g = (torch.randn(n, generator=gen) * 10.0 ** (-1 - t % 2)).to(grad_dtype or param_dtype).to(device)
        key = lowp.Rounding(7, t, 3, offset) if keyed else None
        _step(
            kernel,
            [p],
            [g],
            [buf],
            [sc],
            [0.8],
            [t == 0],
            [key],
            momentum=0.0 if buf is None else 0.9,
            maximize=maximize,
            round_params=round_params,
            weight_decay=weight_decay,
        )
    return p, buf, sc


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _assert_same(kernel, reference):
    """Bit for bit (signed zeros included), except that two NaNs are equal: a NaN's sign
    bit may differ (the kernel multiplies by -1 where the reference negates)."""
    for k, r in zip(kernel, reference, strict=True):
        if r is None:
            assert k is None
            continue
        assert k.dtype == r.dtype and k.shape == r.shape
        if k.dtype in _BITS:
            differ = (k.view(_BITS[k.dtype]) != r.view(_BITS[k.dtype])) & ~(torch.isnan(k) & torch.isnan(r))
        else:
            differ = k != r
        assert not bool(differ.any()), f"{int(differ.sum())} of {k.numel()} {k.dtype} elements differ"


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("buf_dtype", BUF_DTYPES, ids=str)
def test_kernel_equals_reference_bit_for_bit(param_dtype, buf_dtype):
    """Lengths under a block, whole blocks, whole blocks and a short one; an origin past
    2^32 (the key of the high word 1); maximize; bf16 parameters rounded stochastically or
    to nearest."""
    for n in (37, 2 * 2048, 2 * 2048 + 77):
        for offset in (5, 2**32 + 5):
            for maximize, round_params in [(False, True), (True, False)]:
                kw = dict(offset=offset, maximize=maximize, round_params=round_params)
                _assert_same(
                    _steps(True, n, param_dtype, buf_dtype, **kw),
                    _steps(False, n, param_dtype, buf_dtype, **kw),
                )


@pytest.mark.parametrize("buf_dtype", [torch.bfloat16, torch.int8], ids=str)
def test_round_to_nearest_other_gradient_dtypes_and_no_decay(buf_dtype):
    """No rounding keys (round to nearest: int8 half to even), a float32 gradient for a
    bfloat16 parameter and a bfloat16 one for a float32 parameter, no weight decay."""
    for param_dtype, grad_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]:
        kw = dict(offset=0, grad_dtype=grad_dtype, keyed=False, weight_decay=0.0)
        n = 2048 + 300
        _assert_same(
            _steps(True, n, param_dtype, buf_dtype, **kw), _steps(False, n, param_dtype, buf_dtype, **kw)
        )


def _pieces_steps(kernel, specs, steps=3):
    """``steps`` updates of pieces ``(n, param dtype, buffer dtype, origin offset)``, with
    ``_step(kernel, ...)``: all born at step 0, every other one born again at step 1,
    float32 buffers without rounding keys, the gradients' scale falling over the steps."""
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(n, generator=gen).to(pd) for n, pd, _, _ in specs]
    bufs = [torch.empty(n, dtype=bd) for n, _, bd, _ in specs]
    scs = [torch.empty(lowp.num_scales([n])) if bd == torch.int8 else None for n, _, bd, _ in specs]
    for t in range(steps):
        gs = [(torch.randn(n, generator=gen) * 10.0 ** (-t)).to(pd) for n, pd, _, _ in specs]
        born = [t == 0 or (t == 1 and k % 2 == 0) for k in range(len(specs))]
        keys = [
            None if bd == torch.float32 else lowp.Rounding(7, t, k, off)
            for k, (_, _, bd, off) in enumerate(specs)
        ]
        scales = [0.5 + 0.1 * k for k in range(len(specs))]
        kw = dict(momentum=0.9, maximize=False, round_params=True, weight_decay=0.01)
        _step(kernel, ps, gs, bufs, scs, scales, born, keys, **kw)
    return ps, bufs, scs


def test_one_batch_of_mixed_pieces_equals_the_reference():
    """One batch steps pieces of both parameter dtypes and every buffer dtype, born and
    not (some reborn), float32 state without keys, for 3 steps."""
    specs = [  # (n, param dtype, buffer dtype, origin offset)
        (5000, torch.float32, torch.int8, 0),
        (37, torch.bfloat16, torch.bfloat16, 2**32 - 3000),
        (4104, torch.bfloat16, torch.int8, 2**32 + 5),
        (2053, torch.float32, torch.bfloat16, 100),
        (6000, torch.bfloat16, torch.float32, 0),
    ]

    kernel, reference = _pieces_steps(True, specs), _pieces_steps(False, specs)
    for k in range(len(specs)):
        _assert_same(
            [kernel[0][k], kernel[1][k], kernel[2][k]], [reference[0][k], reference[1][k], reference[2][k]]
        )


def test_pieces_split_on_block_boundaries_equal_the_whole():
    """Two shards of one parameter (cut at a whole block, each keyed by its origin in the
    parameter) step to the whole parameter's bits: a sharded run draws what a single
    process draws."""
    n, cut = 3 * 2048 + 77, 2048
    gen = torch.Generator().manual_seed(9)
    p0 = torch.randn(n, generator=gen).to(torch.bfloat16)
    gs = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(3)]

    def run(cuts):
        p, buf, sc = p0.clone(), torch.empty(n, dtype=torch.int8), torch.empty(lowp.num_scales([n]))
        for t, g in enumerate(gs):
            batch = compiled_lowp.Batch()
            for lo, hi in itertools.pairwise(cuts):
                _, coef = _coefficients(0.7, t == 0, lr=0.3, momentum=0.9, weight_decay=0.01, maximize=False)
                batch.add(
                    p[lo:hi],
                    g[lo:hi],
                    buf[lo:hi],
                    sc[lo // 2048 : -(-hi // 2048)],
                    born=t == 0,
                    coef=coef,
                    rounding=lowp.Rounding(7, t, 2, lo),
                    round_param=True,
                )
            batch.run()
        return p, buf, sc

    _assert_same(run([0, cut, n]), run([0, n]))


def _born_int8(g, kernel):
    n = g.numel()
    p, buf, sc = torch.zeros(n), torch.empty(n, dtype=torch.int8), torch.empty(lowp.num_scales([n]))
    _step(
        kernel,
        [p],
        [g.clone()],
        [buf],
        [sc],
        [1.0],
        [True],
        [lowp.Rounding(3, 0, 0, 0)],
        momentum=0.9,
        maximize=False,
        round_params=True,
        weight_decay=0.0,
    )
    return p, buf, sc


def test_tiny_blocks_and_non_finite_momentum_are_encoded_as_the_reference_does():
    """A block whose scale's reciprocal overflows divides instead; a NaN codes 0 and is
    skipped by its block's absmax; an infinity makes its block's scale infinite (finite
    values code 0). Equal to the torch reference and to the numpy one."""
    n = 4 * 2048 + 100
    g = torch.randn(n, generator=torch.Generator().manual_seed(4))
    g[2048:4096] *= 1e-40  # block 1: absmax ~ 4e-40, 1 / s > 3.4e38
    g[5], g[2 * 2048 + 7], g[8200] = float("nan"), float("inf"), float("nan")  # blocks 0, 2, short 4
    (kp, kb, ks), (rp, rb, rs) = _born_int8(g, True), _born_int8(g, False)
    assert torch.equal(kb, rb) and torch.equal(ks, rs)
    torch.testing.assert_close(kp, rp, rtol=0, atol=0, equal_nan=True)
    assert math.isinf(float(ks[1].reciprocal())) and math.isinf(float(ks[2])) and int(kb[5]) == 0
    assert 0 < int((kb[2048:4096].abs() == 127).sum()) < 2048  # divided: codes keep their values
    codes, scales = ref.quantize(g.numpy(), ref.bits(3, "momentum", 0, 0, np.arange(n, dtype=np.uint64)))
    np.testing.assert_array_equal(kb.numpy(), codes)
    np.testing.assert_array_equal(ks.numpy(), scales)


def test_parameters_that_require_grad_are_stepped_with_grad_mode_on():
    """A caller outside ``no_grad`` (an in-backward hook, a user's loop) with an
    ``nn.Parameter``: the batch writes it in place (a leaf that requires grad would refuse
    that under grad mode) and its bits equal the reference's."""
    n = 2048 + 5
    results = []
    for kernel in (True, False):
        p = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
        g = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        buf, sc = torch.zeros(n, dtype=torch.int8), torch.zeros(2)
        args = ([p], [g], [buf], [sc], [0.8], [True], [lowp.Rounding(1, 0, 0, 0)])
        kw = dict(momentum=0.9, maximize=False, round_params=True, weight_decay=0.01)
        with torch.enable_grad():
            if kernel:
                _step(True, *args, **kw)
            else:
                with torch.no_grad():  # the reference's in-place ops need it
                    _step(False, *args, **kw)
        assert p.requires_grad and p.grad_fn is None
        results.append((p.detach(), buf, sc))
    _assert_same(*results)


def test_a_variant_that_fails_to_compile_is_named_and_the_others_are_not(monkeypatch):
    """variant_failure compiles each variant once on tiny tensors: one whose compilation
    raises is reported (its pieces go to the reference), the rest stay available."""
    real = compiled_lowp._compiled

    def compiled(born, round_m, round_p):
        if born:
            raise RuntimeError("no backend for this one\nsecond line")
        return real(born, round_m, round_p)

    monkeypatch.setattr(compiled_lowp, "_compiled", compiled)
    compiled_lowp._variant_failure.cache_clear()
    try:
        p, g = torch.zeros(9, dtype=torch.bfloat16), torch.zeros(9, dtype=torch.bfloat16)
        m, key = torch.zeros(9, dtype=torch.int8), lowp.Rounding(0, 1, 0, 0)
        why = compiled_lowp.variant_failure(p, g, m, key, born=True, round_param=True)
        assert why == "RuntimeError: no backend for this one"
        assert compiled_lowp.variant_failure(p, g, m, key, born=False, round_param=True) is None
    finally:
        compiled_lowp._variant_failure.cache_clear()


def test_supported_refuses_what_the_kernel_does_not_take():
    p, g, m = (
        torch.zeros(8, dtype=torch.bfloat16),
        torch.zeros(8, dtype=torch.bfloat16),
        torch.zeros(8, dtype=torch.int8),
    )
    key = lowp.Rounding(0, 1, 0, 0)
    assert compiled_lowp.supported(p, g, m, key) and compiled_lowp.supported(p, g, None, None)
    assert not compiled_lowp.supported(p.half(), g.half(), m, key)  # float16 parameters
    assert not compiled_lowp.supported(p, torch.zeros(8, dtype=torch.int32), m, key)  # an integer gradient
    assert not compiled_lowp.supported(p, g, m.to(torch.int16), key)  # no such buffer dtype
    assert not compiled_lowp.supported(p, g, torch.zeros(16, dtype=torch.int8)[::2], key)  # not contiguous
    assert not compiled_lowp.supported(p, g.view(2, 4), m, key)  # another shape
    assert not compiled_lowp.supported(p, g, m, lowp.Rounding(0, 1, 0, 2**32 - 4))  # indices cross 2^32
    assert compiled_lowp.supported(p, g, m, lowp.Rounding(0, 1, 0, 2**32 - 8))  # end just below it


def test_each_variant_is_one_kernel_with_no_element_sized_temporary():
    """The single-pass contract in the generated code: every variant compiles to one
    kernel whose only allocation is the int8 rows' absmax (one float per block), so p, g,
    m are read and p, m written once, with no float32 copy of the piece in between (the
    new int8 momentum would be one at inductor's default realize_reads_threshold)."""
    specs = [  # (param dtype, buffer dtype, born)
        (torch.bfloat16, torch.int8, False),
        (torch.float32, torch.int8, True),
        (torch.bfloat16, torch.bfloat16, False),
        (torch.float32, None, False),
    ]

    def step_all():
        n = 3 * 2048 + 5
        for param_dtype, buf_dtype, born in specs:
            p, g = torch.randn(n).to(param_dtype), torch.randn(n).to(param_dtype)
            buf = None if buf_dtype is None else torch.zeros(n, dtype=buf_dtype)
            sc = torch.zeros(4) if buf_dtype == torch.int8 else None
            momentum = 0.0 if buf is None else 0.9
            _, coef = _coefficients(0.8, born, lr=0.1, momentum=momentum, weight_decay=0.01, maximize=False)
            batch = compiled_lowp.Batch()
            batch.add(
                p, g, buf, sc, born=born, coef=coef, rounding=lowp.Rounding(1, 2, 3, 0), round_param=True
            )
            batch.run()

    with torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(step_all)
    # int8: the rows' graph and the short row's; the others one graph each.
    assert len(codes) == 6, len(codes)
    for code in codes:
        assert code.count("async_compile.cpp_pybinding") == 1, code
        shapes = re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)
        assert all(dims.replace(" ", "").endswith(",1") for dims in shapes), shapes  # (rows, 1) only


class _Counted:
    """Counts Batch._call's kernel calls and the ones that failed."""

    def __init__(self, monkeypatch):
        self.calls = self.failed = 0
        real = compiled_lowp.Batch._call

        def call(batch, piece, args):
            self.calls += 1
            ok = real(batch, piece, args)
            self.failed += not ok
            return ok

        monkeypatch.setattr(compiled_lowp.Batch, "_call", call)


ROUTED = [
    (5000, torch.bfloat16, torch.int8, 2**32 + 5),
    (300, torch.float32, torch.bfloat16, 0),
    (4096 + 9, torch.float32, torch.int8, 11),
]


def test_routing_sends_pieces_to_the_kernel_and_equals_the_reference(monkeypatch):
    """With pieces routed to the compiled kernel (as CUDA tensors are), ``fused=None``
    equals ``fused=False`` and every piece went through the kernel."""
    monkeypatch.setattr(functional, "_takes_compiled", lambda param: True)
    _pieces_steps(None, ROUTED)  # compiles (and probes, whose calls are not counted) every variant
    counted = _Counted(monkeypatch)
    kernel = _pieces_steps(None, ROUTED)
    assert counted.calls == 3 * 5 and counted.failed == 0  # int8 pieces: rows and a short row
    reference = _pieces_steps(False, ROUTED)
    assert counted.calls == 3 * 5
    for k in range(len(ROUTED)):
        _assert_same([x[k] for x in kernel], [x[k] for x in reference])


def test_in_backward_hooks_step_through_the_kernel_as_the_reference_does(monkeypatch):
    """InBackwardSGDSaI on a bf16 model with int8 momentum, pieces routed to the compiled
    kernel: every update is made inside backward() (grad mode on, per parameter) by the
    kernel, and 4 steps equal the reference's bit for bit."""

    def run(fused):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.Linear(80, 64)).to(torch.bfloat16)
        opt = InBackwardSGDSaI(model.parameters(), lr=0.05, momentum_dtype="int8", fused=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            model(torch.randn(32, 96, generator=gen).to(torch.bfloat16)).float().pow(2).mean().backward()
        opt.remove()
        return [p.detach().clone() for p in model.parameters()]

    monkeypatch.setattr(functional, "_takes_compiled", lambda param: True)
    run(None)  # compiles (and probes) every variant
    counted = _Counted(monkeypatch)
    kernel = run(None)
    # 4 steps (step 1 fixes g-SNR and updates), 6 calls each: the 7680-element weight's int8
    # rows and short row, the 5120-element one's, two biases (float32 momentum, < 4096 elements).
    assert counted.calls == 4 * 6 and counted.failed == 0
    _assert_same(kernel, run(False))


def test_a_call_that_fails_to_compile_is_stepped_by_the_reference(monkeypatch):
    """A real piece can need a compilation of its own (a shape inductor specialises on, the
    recompile limit): when that one fails, nothing of it was written and the reference
    steps exactly that part (an int8 piece's short row), with the bits it would have had."""
    monkeypatch.setattr(functional, "_takes_compiled", lambda param: True)
    real = compiled_lowp._compiled

    class NoGraph(torch._dynamo.exc.TorchDynamoException):
        pass

    def compiled(*flags):
        kernel = real(*flags)

        def call(p, *args):
            if p.dim() == 2 and p.shape[0] == 1:
                raise NoGraph("short rows refused by this test")
            return kernel(p, *args)

        return call

    monkeypatch.setattr(compiled_lowp, "_compiled", compiled)
    monkeypatch.setattr(compiled_lowp, "_FAILED", {})
    monkeypatch.setattr(compiled_lowp, "_variant_failure", lambda *variant: None)  # the variants compile
    counted = _Counted(monkeypatch)
    kernel = _pieces_steps(None, ROUTED)
    assert counted.failed == 2 * 3 and counted.calls == 3 * 5  # both int8 short rows, each step
    for k in range(len(ROUTED)):
        _assert_same([x[k] for x in kernel], [x[k] for x in _pieces_steps(False, ROUTED)])


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("buf_dtype", BUF_DTYPES, ids=str)
def test_cuda_routing_equals_reference_bit_for_bit(monkeypatch, param_dtype, buf_dtype):
    """On CUDA ``fused=None`` takes the compiled (Triton) kernel; it equals ``fused=False``."""
    assert compiled_lowp.failure("cuda") is None, compiled_lowp.failure("cuda")
    counted = _Counted(monkeypatch)
    for n, offset in [(37, 5), (2 * 2048 + 77, 2**32 + 5), (123 * 2048 + 5, 0)]:
        _assert_same(
            *(_steps(f, n, param_dtype, buf_dtype, offset=offset, device="cuda") for f in (None, False))
        )
    assert counted.calls > 0 and counted.failed == 0  # the kernel, not the reference, ran


@pytest.mark.gpu
def test_cuda_optimizer_with_int8_momentum_and_bf16_params_equals_reference():
    """SGDSaI on a bfloat16 CUDA model with int8 momentum: 4 steps with the compiled kernel
    equal 4 with the reference, parameters and state bit for bit."""

    def run(fused):
        torch.manual_seed(0)
        model = (
            torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.Linear(80, 64)).cuda().to(torch.bfloat16)
        )
        opt = SGDSaI(model.parameters(), lr=0.05, momentum_dtype="int8", fused=fused)
        data = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(32, 96, generator=data).cuda().to(torch.bfloat16)
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt.state_dict()["state"]

    (pk, sk), (pr, sr) = run(None), run(False)
    _assert_same(pk, pr)
    for i in sr:
        for name, value in sr[i].items():
            if isinstance(value, torch.Tensor):
                _assert_same([sk[i][name]], [value])
