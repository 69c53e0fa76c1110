"""The single-pass (fused) step and its automatic selection.

Correctness only: the fused path follows the reference trajectory to 1e-6 (plain tensors,
ZeRO flat segments, FSDP2 local shards), steps in place, and ``fused=None`` falls back
silently when the kernel cannot be built. Speed lives in benchmarks/step_speed.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sai_dist import SGDSaI, functional, native
from sai_dist.layouts.zero import FlatSegmentLayout, Segment
from sai_dist.stats import Piece, reduce_block_moments
from sai_dist.warning_categories import DegenerateGradientWarning
from tests.support.models import TinyTransformer, batches, lm_loss, param_groups
from tests.support.ranks import run_ranks
from tests.support.reference import ReferenceSGDSaI
from tests.unit import fused_ranks

needs_native = pytest.mark.skipif(
    native.library() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}"
)

GROUP_DEFAULTS = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, eps=1e-8, maximize=False)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


class _Spy:
    """Counts calls of ``native.step`` and records the storage it wrote."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.pointers: list[int] = []
        original = native.step

        def spy(params, directions, buffers, kinds, coefs):  # type: ignore[no-untyped-def]
            self.calls += 1
            self.pointers += [p.data_ptr() for p in params]
            return original(params, directions, buffers, kinds, coefs)

        monkeypatch.setattr(native, "step", spy)


def _train(model: nn.Module, opt, steps: int, seed: int, sign: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1-element gate warns once
        for idx in batches(steps, seed=seed):
            (sign * lm_loss(model, idx)).backward()
            opt.step()
            for p in model.parameters():
                p.grad = None


@needs_native
@pytest.mark.parametrize(
    "normalize,maximize,weight_decay,momentum",
    [(True, False, 1e-2, 0.9), (False, True, 0.3, 0.9), (True, True, 0.0, 0.0), (False, False, 1e-2, 0.0)],
)
def test_fused_matches_reference_trajectory(monkeypatch, normalize, maximize, weight_decay, momentum):
    """fused=True (and the default, which picks it on CPU float32) against the independent
    reference and against the foreach path, 12 steps, three param groups."""
    spy = _Spy(monkeypatch)
    torch.manual_seed(3)
    models = [TinyTransformer() for _ in range(1)]
    models += [copy.deepcopy(models[0]) for _ in range(3)]
    defaults = {**GROUP_DEFAULTS, "weight_decay": weight_decay, "maximize": maximize, "momentum": momentum}
    kw = dict(lr=0.05, weight_decay=weight_decay, momentum=momentum, normalize=normalize, maximize=maximize)
    fused = SGDSaI(param_groups(models[0]), fused=True, **kw)
    auto = SGDSaI(param_groups(models[1]), **kw)
    foreach = SGDSaI(param_groups(models[2]), fused=False, foreach=True, **kw)
    groups = [{**defaults, **g} for g in param_groups(models[3])]
    for g in groups:
        if momentum == 0:
            g["momentum"] = 0.0
    ref = ReferenceSGDSaI(groups, normalize=normalize)
    if momentum == 0:
        for opt in (fused, auto, foreach):
            for g in opt.param_groups:
                g["momentum"] = 0.0
    sign = -1.0 if maximize else 1.0
    for model, opt in zip(models, (fused, auto, foreach, ref), strict=True):
        _train(model, opt, 12, seed=5, sign=sign)
    assert spy.calls == 2 * 12 * 3  # fused and auto: one kernel call per group per step
    for model in models[:3]:
        worst = max(_max_rel(p, q) for p, q in zip(model.parameters(), models[3].parameters(), strict=True))
        assert worst < 1e-6, worst
    for a, b in zip(models[0].parameters(), models[2].parameters(), strict=True):
        assert _max_rel(a, b) < 1e-6


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_kernel_splits_many_tensors_like_the_loop(threads):
    """Enough elements to run threaded, threads splitting inside tensors of odd sizes, a
    channels_last tensor, an empty one; every kind of update (momentum, fresh, plain)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        shapes = [(257, 129), (1,), (0,), (3, 5, 7, 11), (40_001,), (64, 3, 5, 5), (7,)]
        params = [torch.randn(s, generator=gen) for s in shapes]
        params[5] = params[5].to(memory_format=torch.channels_last)
        ref_params = [p.clone() for p in params]
        scales = [0.5 + i / 10 for i in range(len(shapes))]
        bufs: list = [None] * len(shapes)
        ref_bufs: list = [None] * len(shapes)
        for _ in range(4):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            grads[5] = grads[5].to(memory_format=torch.channels_last)
            hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.05, maximize=True)
            functional.sgd_sai(params, grads, bufs, scales, fused=True, **hyper)
            functional.sgd_sai(ref_params, grads, ref_bufs, scales, fused=False, foreach=False, **hyper)
            plain = dict(lr=0.1, momentum=0.0, weight_decay=0.0, maximize=False)
            functional.sgd_sai(params, grads, [None] * len(shapes), scales, fused=True, **plain)
            functional.sgd_sai(ref_params, grads, [None] * len(shapes), scales, fused=False, **plain)
        for a, b in zip(params + bufs, ref_params + ref_bufs, strict=True):
            if a.numel():
                assert _max_rel(a, b) < 1e-6
        assert params[5].is_contiguous(memory_format=torch.channels_last)
    finally:
        torch.set_num_threads(saved)


@needs_native
def test_zero_flat_segments_are_stepped_in_place_like_whole_blocks(monkeypatch):
    """ZeRO-style flat partitions: segments of three blocks with padding, stepped as views
    of the flat tensor (the kernel writes the flat's own storage, nothing is copied), equal
    to SGDSaI on the whole blocks; the momentum buffer's padding is zero."""
    spy = _Spy(monkeypatch)
    torch.manual_seed(1)
    blocks = [torch.randn(4, 5), torch.randn(7), torch.randn(3, 3)]
    whole = [nn.Parameter(b.clone()) for b in blocks]
    # flat 1: block 0 whole, then block 1[0:3], 2 padding; flat 2: block 1[3:7], block 2, 1 padding
    f1 = nn.Parameter(torch.cat([blocks[0].reshape(-1), blocks[1][:3], torch.zeros(2)]))
    f2 = nn.Parameter(torch.cat([blocks[1][3:], blocks[2].reshape(-1), torch.zeros(1)]))
    layout = FlatSegmentLayout(None, blocks, ["a", "b", "c"], [20, 7, 9])
    layout.add_flat(f1, [Segment(0, 0, 20, 0), Segment(1, 20, 23, 0)])
    layout.add_flat(f2, [Segment(1, 0, 4, 3), Segment(2, 4, 13, 0)])
    opt = SGDSaI([f1, f2], lr=0.1, weight_decay=0.02, layout=layout)
    ref = SGDSaI(whole, lr=0.1, weight_decay=0.02, fused=False)
    storage = (f1.data_ptr(), f2.data_ptr())
    for step in range(6):
        grads = [
            torch.randn(b.shape, generator=torch.Generator().manual_seed(step + 10 * i))
            for i, b in enumerate(blocks)
        ]
        for w, g in zip(whole, grads, strict=True):
            w.grad = g.clone()
        f1.grad = torch.cat([grads[0].reshape(-1), grads[1][:3], torch.full((2,), 9.0)])
        f2.grad = torch.cat([grads[1][3:], grads[2].reshape(-1), torch.full((1,), -9.0)])
        opt.step()
        ref.step()
    assert (f1.data_ptr(), f2.data_ptr()) == storage
    got = [f1[:20].view(4, 5), torch.cat([f1[20:23], f2[:4]]), f2[4:13].view(3, 3)]
    for g, w in zip(got, whole, strict=True):
        assert _max_rel(g.detach(), w.detach()) < 1e-6
    # Every pointer the kernel wrote lies inside a flat's own storage.
    lo_hi = [(f.data_ptr(), f.data_ptr() + 4 * f.numel()) for f in (f1, f2)]
    assert spy.calls == 6 and all(any(lo <= p < hi for lo, hi in lo_hi) for p in spy.pointers)
    assert float(opt.state[f1]["momentum_buffer"][23:].abs().sum()) == 0.0
    assert float(opt.state[f2]["momentum_buffer"][13:].abs().sum()) == 0.0
    assert torch.equal(f1.detach()[23:], torch.zeros(2))  # padding never stepped


@needs_native
def test_fused_step_bumps_autograd_versions_like_in_place_ops():
    """A graph that saved a parameter before the step must notice the step, as it does for
    torch's in-place updates."""
    w = nn.Parameter(torch.randn(4, 3))
    opt = SGDSaI([w], lr=0.1, fused=True)
    w.grad = torch.randn(4, 3)
    opt.step()  # step 1 fixes g-SNR and creates the buffer
    x = torch.randn(2, 4, requires_grad=True)
    y = (x @ w).square().sum()  # saves w for backward
    versions = (w._version, opt.state[w]["momentum_buffer"]._version)
    opt.step()
    assert w._version > versions[0] and opt.state[w]["momentum_buffer"]._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@needs_native
def test_native_moments_match_float64_torch_mixed_with_torch_pieces():
    """Statistics: native pieces (CPU float32, dense) and torch pieces (a strided view, a
    float64 tensor) in one reduction agree with float64 torch on the whole blocks."""
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(300, 301, generator=gen) * 3 + 100  # |mean| >> std
    strided = torch.randn(10, 12, generator=gen)[:, ::2]
    dbl = torch.randn(50, dtype=torch.float64, generator=gen)
    sources = [(big, [Piece(0)]), (strided, [Piece(1)]), (dbl, [Piece(2)])]
    m = reduce_block_moments(sources, 3, None)
    for b, g in enumerate((big, strided, dbl)):
        g = g.double()
        torch.testing.assert_close(m.sumsq[b], g.square().sum(), rtol=1e-12, atol=0)
        torch.testing.assert_close(m.std[b], g.std(), rtol=1e-10, atol=0)


def test_auto_falls_back_silently_without_a_compiler(monkeypatch, tmp_path):
    """No C compiler: the default steps through foreach without a warning and follows the
    reference; fused=True raises with nothing changed."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SAI_DIST_KERNEL_DIR", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        assert native.library() is None and "no C compiler" in (native.unavailable_reason() or "")
        assert not functional.fused_available("cpu")
        torch.manual_seed(4)
        model = TinyTransformer()
        ref_model = copy.deepcopy(model)
        opt = SGDSaI(param_groups(model), lr=0.05)
        ref = ReferenceSGDSaI([{**GROUP_DEFAULTS, **g} for g in param_groups(ref_model)])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", DegenerateGradientWarning)
            for m, o in ((model, opt), (ref_model, ref)):
                _train(m, o, 4, seed=4, sign=1.0)
        worst = max(_max_rel(p, q) for p, q in zip(model.parameters(), ref_model.parameters(), strict=True))
        assert worst < 1e-6
        strict = SGDSaI([nn.Parameter(torch.ones(3))], fused=True)
        strict.param_groups[0]["params"][0].grad = torch.tensor([1.0, 2.0, 4.0])
        with pytest.raises(RuntimeError, match="kernel is unavailable"):
            strict.step()
        assert torch.equal(strict.param_groups[0]["params"][0].detach(), torch.ones(3))
        assert "momentum_buffer" not in strict.state[strict.param_groups[0]["params"][0]]
    finally:
        native.library.cache_clear()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SAI_DIST_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and "SAI_DIST_NATIVE=0" in (native.unavailable_reason() or "")
    finally:
        native.library.cache_clear()


@needs_native
@pytest.mark.distributed
def test_fsdp2_local_shards_fused_equals_foreach():
    """FSDP2 (2 gloo ranks): the default steps each DTensor's local shard in place through
    the native kernel, equal to fused=False to 1e-6; three all-reduces at step 1 (the
    consistency check and two statistics passes), none after."""
    for out in run_ranks(fused_ranks.fused_vs_foreach_on_shards, 2, timeout=180):
        assert out["native_available"]
        assert out["native_calls"] == 5
        assert out["in_place"]
        assert out["worst"] < 1e-6, out["worst"]
        # Step 1: the cross-rank check and one batched all_reduce per statistics pass.
        assert out["collectives"] == [3, 0, 0, 0, 0]


@pytest.mark.slow
def test_compiled_kernel_for_cuda_matches_the_loop():
    """The torch.compile'd kernels that ``fused`` uses on CUDA, run here on CPU tensors
    (one compilation, tens of seconds on 2 cores): same update as the reference loop."""
    if functional._compile_failure("cpu") is not None:
        pytest.skip(f"torch.compile unavailable on CPU: {functional._compile_failure('cpu')}")
    gen = torch.Generator().manual_seed(6)
    shapes = [(33, 7), (5,), (2, 3, 4)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    ref_params = [p.clone() for p in params]
    scales = [0.3, 1.0, 0.7]
    bufs = [torch.empty(s) for s in shapes]
    ref_bufs = [torch.empty(s) for s in shapes]
    for step in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        born = [step == 0] * 3
        hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.05, maximize=step == 2)
        functional._compiled_sgd_sai(params, grads, bufs, scales, born, **hyper)
        functional._single_tensor_sgd_sai(ref_params, grads, ref_bufs, scales, born, **hyper)
        plain = dict(lr=0.1, momentum=0.0, weight_decay=0.1, maximize=True)
        functional._compiled_sgd_sai(params, grads, [None] * 3, scales, [False] * 3, **plain)
        functional._single_tensor_sgd_sai(ref_params, grads, [None] * 3, scales, [False] * 3, **plain)
    for a, b in zip(params + bufs, ref_params + ref_bufs, strict=True):
        assert _max_rel(a, b) < 1e-6
