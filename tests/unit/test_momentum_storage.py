"""Low-precision state (issue 16): bf16 / int8 momentum, bf16 parameters with stochastic
rounding. Checked against the independent numpy reference in ``tests/support/lowp_reference.py``
and against the documented properties (unbiased rounding, one quantization step, blocks
laid from each piece's start, bit-identical resume, exact state bytes)."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from sai_dist import SGDSaI
from sai_dist import momentum as lowp
from sai_dist.functional import sgd_sai
from sai_dist.layouts import ReplicatedLayout
from tests.support import lowp_reference as ref


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    # 5000 elements (>= SMALL: int8, two full blocks and a short one), 40 (< SMALL: fp32 under int8).
    model = nn.Sequential(nn.Linear(50, 100), nn.Linear(100, 1, bias=False)).to(dtype)
    return model


def _batch(step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 50, generator=g).to(dtype)
    y = torch.randn(32, 1, generator=g).to(dtype)
    return x, y


def _train(model, opt, steps, dtype, start=0):
    for s in range(start, start + steps):
        x, y = _batch(s, dtype)
        loss = (model(x).float() - y.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


# -- the generator and the rounding primitives ------------------------------------------------


def test_generator_matches_documented_formula_and_is_offset_invariant():
    r = lowp.Rounding(seed=7, step=3, block=5, offset=0)
    idx = np.array([0, 1, 2, 2047, 2048, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**33 + 11], dtype=np.uint64)
    cpu = torch.device("cpu")
    got = torch.cat([r.draws(int(i), 1, cpu) for i in idx]).numpy().astype(np.uint64)
    np.testing.assert_array_equal(got, ref.draw(7, 3, 5, idx))
    # The streams are the draw's halves: the parameter's the high 16 bits, the momentum's the low.
    for stream, name in ((lowp.STREAM_PARAM, "param"), (lowp.STREAM_MOMENTUM, "momentum")):
        got = torch.cat([r.bits(stream, int(i), 1, cpu) for i in idx]).numpy().astype(np.uint64)
        np.testing.assert_array_equal(got, ref.bits(7, name, 3, 5, idx))
    # A run of indices across a multiple of 2^32 takes each element's own high word's key.
    across = lowp.Rounding(7, 3, 5, 2**32 - 3).draws(0, 6, cpu).numpy().astype(np.uint64)
    np.testing.assert_array_equal(across, ref.draw(7, 3, 5, np.arange(2**32 - 3, 2**32 + 3, dtype=np.uint64)))
    # A piece starting at element 1000 of its parameter draws what the whole tensor draws there.
    whole = r.bits(lowp.STREAM_PARAM, 0, 5000, cpu)
    piece = lowp.Rounding(seed=7, step=3, block=5, offset=1000).bits(lowp.STREAM_PARAM, 0, 4000, cpu)
    assert torch.equal(whole[1000:], piece)
    # Streams, steps, blocks and seeds give different draws (16-bit values: 1/65536 equal by chance).
    others = [
        lowp.Rounding(7, 3, 5, 0).bits(lowp.STREAM_MOMENTUM, 0, 5000, cpu),
        lowp.Rounding(7, 4, 5, 0).bits(lowp.STREAM_PARAM, 0, 5000, cpu),
        lowp.Rounding(7, 3, 6, 0).bits(lowp.STREAM_PARAM, 0, 5000, cpu),
        lowp.Rounding(8, 3, 5, 0).bits(lowp.STREAM_PARAM, 0, 5000, cpu),
    ]
    for other in others:
        assert (other == whole).float().mean() < 0.01


def test_generator_bits_are_uniform_and_uncorrelated():
    """The properties stochastic rounding relies on, at the sample sizes a step uses: each
    stream's 16 bits uniform, and no correlation between neighbouring elements, between the
    two streams of one element, or between consecutive steps of one element."""
    n, cpu = 1 << 20, torch.device("cpu")
    r = lowp.Rounding(seed=0, step=0, block=0, offset=0)
    m = _uniform(r.bits(lowp.STREAM_MOMENTUM, 0, n, cpu))
    p = _uniform(r.bits(lowp.STREAM_PARAM, 0, n, cpu))
    m_next_step = _uniform(lowp.Rounding(0, 1, 0, 0).bits(lowp.STREAM_MOMENTUM, 0, n, cpu))
    # mean 1/2 and variance 1/12, to 6 standard errors of n draws
    for u in (m, p):
        assert abs(float(u.mean()) - 0.5) < 6 * (1 / 12 / n) ** 0.5
        assert abs(float(u.var()) - 1 / 12) < 6 * (1 / 180 / n) ** 0.5
        counts = torch.bincount((u * 256).long(), minlength=256).double()
        chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
        assert chi2 < 255 + 6 * (2 * 255) ** 0.5, chi2
    # correlation coefficients of independent uniforms have standard error 1/sqrt(n)
    pairs = [(m[:-1], m[1:]), (p[:-1], p[1:]), (m, p), (m, m_next_step), (m[:-16], m[16:])]
    for a, b in pairs:
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 6 / n**0.5


def _uniform(bits):
    return bits.double() / 2**16


def test_bf16_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of the way to the next bf16
    bits = lowp.Rounding(0, 0, 0, 0).bits(lowp.STREAM_MOMENTUM, 0, x.numel(), torch.device("cpu"))
    y = lowp.round_bfloat16(x, bits).to(torch.float32)
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2**-7}
    # E[y] = x; the standard error of the mean is 2^-7 * sqrt(p(1-p)/n) ~ 5.8e-6.
    assert abs(float(y.double().mean()) - (1.0 + 2**-10)) < 3e-5
    xn = -x
    yn = lowp.round_bfloat16(xn, bits).to(torch.float32)
    assert torch.equal(yn, -y)
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0])
    out = lowp.round_bfloat16(special, bits[:4]).to(torch.float32)
    assert out[0] == math.inf and out[1] == -math.inf and math.isnan(out[2]) and out[3] == 0


def test_fp16_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-13, dtype=torch.float32)  # 1/8 of an fp16 ulp above 1
    bits = lowp.Rounding(0, 0, 0, 0).bits(lowp.STREAM_PARAM, 0, x.numel(), torch.device("cpu"))
    y = lowp.round_float16(x, bits).to(torch.float32)
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2**-10}
    assert abs(float(y.double().mean()) - float(x[0])) < 4e-6


def test_bf16_ema_keeps_small_gradients_that_nearest_rounding_drops():
    # m = 1, g = 1.004: (1 - beta)(g - m) = 4e-4 is below half a bf16 ulp at 1 (2^-8).
    n, beta, g = 20_000, 0.9, 1.004
    nearest = torch.ones(n, dtype=torch.bfloat16)
    sr = torch.ones(n, dtype=torch.bfloat16)
    exact = 1.0
    for t in range(30):
        nearest = (beta * nearest.float() + (1 - beta) * g).to(torch.bfloat16)
        bits = lowp.Rounding(0, t, 0, 0).bits(lowp.STREAM_MOMENTUM, 0, n, torch.device("cpu"))
        sr = lowp.round_bfloat16(beta * sr.float() + (1 - beta) * g, bits)
        exact = beta * exact + (1 - beta) * g
    assert torch.all(nearest == 1.0)  # stuck
    assert abs(float(sr.double().mean()) - exact) < 2e-4, (float(sr.double().mean()), exact)


def test_int8_codes_within_one_step_of_their_block_and_unbiased():
    torch.manual_seed(0)
    m = torch.randn(5000) * torch.linspace(0.01, 3, 5000)
    codes = torch.empty(5000, dtype=torch.int8)
    scales = torch.empty(lowp.num_scales([5000]))
    assert scales.numel() == 3
    lowp.encode(m, codes, scales, lowp.Rounding(0, 0, 0, 0))
    want = torch.tensor([m[i : i + 2048].abs().max() / 127 for i in range(0, 5000, 2048)])
    torch.testing.assert_close(scales, want, rtol=0, atol=0)
    back = lowp.decode(codes, scales)
    step = scales.repeat_interleave(2048)[:5000]
    assert torch.all((back - m).abs() <= step * (1 + 1e-6))
    # Unbiased: averaged over many independent draws, the decoded value tends to m.
    draws = torch.stack([lowp.decode(*_enc(m, lowp.Rounding(0, t, 0, 0))) for t in range(200)])
    err = (draws.mean(0) - m).abs() / step
    assert float(err.mean()) < 0.05


def _enc(m, rounding):
    codes = torch.empty(m.numel(), dtype=torch.int8)
    scales = torch.empty(lowp.num_scales([m.numel()]))
    lowp.encode(m, codes, scales, rounding)
    return codes, scales


# -- the optimizer against the numpy reference ------------------------------------------------


@pytest.mark.parametrize(
    "momentum_dtype,param_dtype",
    [
        ("bfloat16", torch.float32),
        ("int8", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("int8", torch.bfloat16),
    ],
)
def test_trajectory_matches_independent_reference(momentum_dtype, param_dtype):
    model, twin = _model(param_dtype), _model(param_dtype)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    opt = SGDSaI(model.parameters(), momentum_dtype=momentum_dtype, seed=3, **kw)
    reference = ref.ReferenceLowPrecision(
        list(twin.parameters()), momentum_dtype=momentum_dtype, seed=3, **kw
    )
    _train(model, opt, 8, param_dtype)
    _train(twin, reference, 8, param_dtype)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        p32, q32 = p.detach().float(), q.detach().float()
        # The same draws; float32 arithmetic of the two implementations may differ in the last
        # bit (fused multiply-add, a float32 against a float64 g-SNR scale), which moves a
        # rounding across its threshold for a handful of elements: by one ulp of the stored type.
        ulp = (2.0**-7 if param_dtype == torch.bfloat16 else 2.0**-20) * q32.abs().clamp_min(2**-20)
        assert torch.all((p32 - q32).abs() <= 2 * ulp + 1e-6), float((p32 - q32).abs().max())
        if param_dtype == torch.bfloat16:  # float32 parameters differ in low bits everywhere
            assert float((p32 == q32).float().mean()) > 0.99


def test_storage_layout_small_tensor_rule_and_exact_state_bytes():
    model = _model()
    opt = SGDSaI(model.parameters(), momentum_dtype="int8")
    _train(model, opt, 2, torch.float32)
    big, bias, small = (opt.state[p] for p in model.parameters())
    assert big["momentum_buffer"].dtype == torch.int8 and big["momentum_scale"].shape == (3,)
    assert bias["momentum_buffer"].dtype == torch.float32 and "momentum_scale" not in bias
    assert small["momentum_buffer"].dtype == torch.float32
    measured = sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for k, t in st.items()
        if k in ("momentum_buffer", "momentum_scale")
    )
    predicted = sum(lowp.state_bytes("int8", p.numel(), [p.numel()], p.dtype) for p in model.parameters())
    assert measured == predicted == 5000 + 4 * 3 + 4 * 100 + 4 * 100
    sd = opt.state_dict()
    assert sd["state"][0]["momentum_buffer"].dtype == torch.int8  # compressed in the state dict


@pytest.mark.parametrize(
    "momentum_dtype,param_dtype",
    [("bfloat16", torch.float32), ("int8", torch.float32), ("int8", torch.bfloat16), (None, torch.bfloat16)],
)
def test_resume_is_bit_identical(momentum_dtype, param_dtype):
    straight = _model(param_dtype)
    opt = SGDSaI(straight.parameters(), momentum_dtype=momentum_dtype, seed=11)
    _train(straight, opt, 6, param_dtype)

    first = _model(param_dtype)
    opt1 = SGDSaI(first.parameters(), momentum_dtype=momentum_dtype, seed=11)
    _train(first, opt1, 3, param_dtype)
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob)
    resumed = _model(param_dtype, seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = SGDSaI(resumed.parameters(), momentum_dtype=momentum_dtype, seed=11)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 3, param_dtype, start=3)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


def test_loading_another_momentum_dtype_converts():
    model = _model()
    opt = SGDSaI(model.parameters(), momentum_dtype="int8")
    _train(model, opt, 3, torch.float32)
    sd = opt.state_dict()
    w = next(model.parameters())
    exact = lowp.decode(opt.state[w]["momentum_buffer"].reshape(-1), opt.state[w]["momentum_scale"])
    as_fp32 = SGDSaI(model.parameters(), momentum_dtype="float32")
    as_fp32.load_state_dict(sd)
    assert as_fp32.state[w]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(as_fp32.state[w]["momentum_buffer"].reshape(-1), exact)  # exact decode
    assert "momentum_scale" not in as_fp32.state[w]
    as_bf16 = SGDSaI(model.parameters(), momentum_dtype=torch.bfloat16)
    as_bf16.load_state_dict(as_fp32.state_dict())
    buf = as_bf16.state[w]["momentum_buffer"]
    assert buf.dtype == torch.bfloat16
    assert torch.equal(buf.reshape(-1), exact.to(torch.bfloat16))  # one rounding to nearest
    back = SGDSaI(model.parameters(), momentum_dtype="int8")
    back.load_state_dict(as_fp32.state_dict())
    scales = back.state[w]["momentum_scale"]
    again = lowp.decode(back.state[w]["momentum_buffer"].reshape(-1), scales)
    assert torch.all(
        (again - exact).abs() <= 0.5 * scales.repeat_interleave(2048)[: exact.numel()] * (1 + 1e-6)
    )
    # Both keep training.
    _train(model, back, 1, torch.float32, start=3)


# -- pieces: blocks laid from each piece's start ---------------------------------------------


def _step_pieces(cut, momentum_dtype="int8", steps=3):
    """Step one 6000-element tensor as two pieces split at ``cut`` (0: one piece)."""
    torch.manual_seed(0)
    p = torch.randn(6000)
    buf = torch.empty(6000, dtype=lowp.storage_dtype(momentum_dtype, 6000, torch.float32))
    spans = [(0, 6000)] if cut == 0 else [(0, cut), (cut, 6000)]
    scale_store = torch.zeros(lowp.num_scales([b - a for a, b in spans]))
    for t in range(steps):
        g = torch.randn(6000, generator=torch.Generator().manual_seed(t))
        k = 0
        views = []
        for a, b in spans:
            n = lowp.num_scales([b - a])
            views.append((p[a:b], g[a:b], buf[a:b], scale_store[k : k + n], lowp.Rounding(0, t, 0, a)))
            k += n
        sgd_sai(
            [v[0] for v in views],
            [v[1] for v in views],
            [v[2] for v in views],
            [0.7] * len(views),
            lr=0.1,
            momentum=0.9,
            weight_decay=0.0,
            maximize=False,
            born=[t == 0] * len(views),
            momentum_scales=[v[3] if buf.dtype == torch.int8 else None for v in views],
            rounding=[v[4] for v in views],
        )
    return p, buf, scale_store


def test_pieces_on_block_boundaries_are_bit_identical_to_whole_tensor():
    whole = _step_pieces(0)
    split = _step_pieces(4096)  # a multiple of BLOCK
    assert torch.equal(whole[0], split[0]) and torch.equal(whole[1], split[1])
    assert torch.equal(whole[2], split[2])
    bf_whole, bf_split = _step_pieces(0, "bfloat16"), _step_pieces(1000, "bfloat16")  # bf16 has no blocks
    assert torch.equal(bf_whole[0], bf_split[0]) and torch.equal(bf_whole[1], bf_split[1])


def test_pieces_off_block_boundaries_within_one_quantization_step():
    whole = _step_pieces(0, steps=1)
    split = _step_pieces(3000, steps=1)  # blocks restart at 3000: other scales
    step = torch.maximum(
        whole[2].repeat_interleave(2048)[:6000],
        torch.cat([split[2][:2].repeat_interleave(2048)[:3000], split[2][2:].repeat_interleave(2048)[:3000]]),
    )
    m_whole = lowp.decode(whole[1], whole[2])
    m_split = torch.cat(
        [lowp.decode(split[1][:3000], split[2][:2]), lowp.decode(split[1][3000:], split[2][2:])]
    )
    gap = (m_whole - m_split).abs() / step
    assert float(gap.max()) <= 1.0 + 1e-6, float(gap.max())
    # Step 1 updates the parameter with the unquantized m = g: identical.
    assert torch.equal(whole[0], split[0])


# -- bad input ---------------------------------------------------------------------------------


def test_bad_settings_are_refused_by_name():
    p = nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match=r"momentum_dtype.*'float16'"):
        SGDSaI([p], momentum_dtype="float16")
    with pytest.raises(ValueError, match="momentum_dtype"):
        SGDSaI([p], momentum_dtype=torch.int16)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        SGDSaI([p], stochastic_rounding="yes")
    with pytest.raises(ValueError, match="seed"):
        SGDSaI([p], seed=-1)
    h = nn.Parameter(torch.randn(10, dtype=torch.float16))
    with pytest.raises(
        ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*float16.*stochastic_rounding=False"
    ):
        SGDSaI([p, h], stochastic_rounding=False)
    SGDSaI([h])  # the default rounds float16 stochastically


class _NoIndexLayout(ReplicatedLayout):
    def element_origin(self, param):
        return None


def test_low_precision_on_a_layout_without_element_indices_is_refused_with_nothing_modified():
    w = nn.Parameter(torch.randn(5000))
    opt = SGDSaI([w], momentum_dtype="int8", layout=_NoIndexLayout())
    w.grad = torch.randn(5000)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"momentum_dtype='int8'.*_NoIndexLayout"):
        opt.step()
    assert torch.equal(w, before) and not opt.state


def test_checkpoint_with_wrong_codes_or_scales_is_refused_with_nothing_modified():
    model = _model()
    opt = SGDSaI(model.parameters(), momentum_dtype="int8")
    _train(model, opt, 2, torch.float32)
    good = opt.state_dict()
    target = SGDSaI(model.parameters(), momentum_dtype="int8")
    for mutate, pattern in [
        (lambda e: e.__setitem__("momentum_scale", torch.ones(2)), r"momentum_scale of 3 block scales"),
        (lambda e: e.pop("momentum_scale"), r"momentum_scale of 3 block scales"),
        (lambda e: e.__setitem__("momentum_buffer", torch.zeros(100, 49, dtype=torch.int8)), "shape"),
        (lambda e: e.__setitem__("momentum_buffer", torch.zeros(100, 50, dtype=torch.int32)), "int32"),
    ]:
        bad = {"state": {k: dict(v) for k, v in good["state"].items()}, "param_groups": good["param_groups"]}
        mutate(bad["state"][0])
        with pytest.raises(ValueError, match=pattern) as info:
            target.load_state_dict(bad)
        assert "param_groups[0]['params'][0]" in str(info.value)
        assert not target.state
    bias = {"state": {k: dict(v) for k, v in good["state"].items()}, "param_groups": good["param_groups"]}
    bias["state"][1]["momentum_scale"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"params'\]\[1\].*only int8 momentum has block scales"):
        target.load_state_dict(bias)


# -- optimizer-in-backward --------------------------------------------------------------------


def test_in_backward_takes_the_keywords_and_matches_the_normal_step():
    from sai_dist.in_backward import InBackwardSGDSaI

    normal, inb = _model(torch.bfloat16), _model(torch.bfloat16)
    kw = dict(lr=0.05, momentum_dtype="int8", seed=5)
    opt = SGDSaI(normal.parameters(), **kw)
    _train(normal, opt, 4, torch.bfloat16)
    runner = InBackwardSGDSaI(inb.parameters(), **kw)
    for s in range(4):
        x, y = _batch(s, torch.bfloat16)
        (inb(x).float() - y.float()).pow(2).mean().backward()
    for p, q in zip(normal.parameters(), inb.parameters(), strict=True):
        assert torch.equal(p, q)
    assert runner.optimizer.state[next(inb.parameters())]["momentum_buffer"].dtype == torch.int8


# -- accounting --------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum_dtype", ["float32", "bfloat16", "int8", None])
def test_accounting_predicts_the_measured_state_bytes(momentum_dtype, capsys):
    import json

    from sai_dist.memory.accounting import rank_memory
    from sai_dist.memory.cli import add_arguments, report
    from sai_dist.memory.models import resolve_model

    model = _model(torch.bfloat16)
    opt = SGDSaI(model.parameters(), momentum_dtype=momentum_dtype)
    _train(model, opt, 1, torch.bfloat16)
    measured = sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for k, t in st.items()
        if k in ("momentum_buffer", "momentum_scale")
    )
    shapes = [tuple(p.shape) for p in model.parameters()]
    mem = rank_memory(shapes, "single", momentum_dtype=momentum_dtype, param_dtype="bfloat16")
    assert mem.state["sgd_sai"] == measured
    assert mem.params == mem.grads == 2 * sum(p.numel() for p in model.parameters()) and mem.master == 0
    # The CLI reports the same through --json (gpt2 preset: int8 is ~1 B/element + scales).
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--model", "gpt2", "--strategies", "single", "--json"]
        + ([] if momentum_dtype is None else ["--momentum-dtype", momentum_dtype])
    )
    spec = resolve_model("gpt2")
    out = json.loads(json.dumps(report(spec, args)))
    want = rank_memory([s for _, s in spec.params], "single", momentum_dtype=momentum_dtype)
    assert out["strategies"]["single"]["state"]["sgd_sai"] == want.state["sgd_sai"]
    # ZeRO models momentum_dtype (test_memory_accounting.py), not pure bf16 parameters.
    with pytest.raises(ValueError, match=r"param_dtype='bfloat16'.*not zero2"):
        rank_memory(shapes, "zero2", 2, momentum_dtype=momentum_dtype, param_dtype="bfloat16")


# -- DCP checkpoints and the training job ------------------------------------------------------


@pytest.mark.parametrize(
    "momentum_dtype,param_dtype", [("int8", torch.float32), ("bfloat16", torch.bfloat16)]
)
def test_dcp_checkpoint_resume_is_bit_identical(tmp_path, momentum_dtype, param_dtype):
    import sai_dist.checkpoint as ckpt

    straight = _model(param_dtype)
    opt = SGDSaI(straight.parameters(), momentum_dtype=momentum_dtype, seed=4)
    _train(straight, opt, 5, param_dtype)
    first = _model(param_dtype)
    opt1 = SGDSaI(first.parameters(), momentum_dtype=momentum_dtype, seed=4)
    _train(first, opt1, 2, param_dtype)
    ckpt.save(str(tmp_path / "c"), first, opt1)
    resumed = _model(param_dtype, seed=5)
    opt2 = SGDSaI(resumed.parameters(), momentum_dtype=momentum_dtype, seed=4)
    ckpt.load(str(tmp_path / "c"), resumed, opt2)
    w = next(resumed.parameters())
    assert (
        opt2.state[w]["momentum_buffer"].dtype
        == opt1.state[next(first.parameters())]["momentum_buffer"].dtype
    )
    _train(resumed, opt2, 3, param_dtype, start=2)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    # Into an optimizer of another momentum_dtype: converted, not misread.
    other = SGDSaI(_model(param_dtype).parameters(), momentum_dtype="float32")
    model_o = _model(param_dtype)
    other = SGDSaI(model_o.parameters(), momentum_dtype="float32")
    ckpt.load(str(tmp_path / "c"), model_o, other)
    src = opt1.state[next(first.parameters())]
    want = lowp.decode(src["momentum_buffer"].reshape(-1), src.get("momentum_scale"))
    assert torch.equal(other.state[next(model_o.parameters())]["momentum_buffer"].reshape(-1), want)


def test_dcp_int8_flat_state_saves_scale_runs_and_resumes_bit_identical(tmp_path):
    """The flat optimizer state dict (the job's and torchtitan's form) carries the int8
    scales as the table of runs (start, scale) of sai_dist.checkpoint, not per-rank scales,
    and resumes bit for bit."""
    import torch.distributed.checkpoint as dcp

    import sai_dist.checkpoint as ckpt

    model = _model()
    opt = SGDSaI(model.parameters(), momentum_dtype="int8", seed=4)
    _train(model, opt, 2, torch.float32)
    ckpt.save(str(tmp_path / "c"), model, opt, flatten=True)
    w = next(model.parameters())
    assert "momentum_scale" in opt.state[w]  # the live state keeps its per-rank scales
    meta = dcp.FileSystemReader(str(tmp_path / "c")).read_metadata().state_dict_metadata
    assert "optim.state.0.weight.momentum_run_start" in meta
    assert not any(k.endswith("momentum_scale") for k in meta)
    assert list(meta["optim.state.0.weight.momentum_run_start"].size) == [3]  # 5000 = 2048 + 2048 + 904
    resumed = _model(seed=5)
    opt2 = SGDSaI(resumed.parameters(), momentum_dtype="int8", seed=4)
    ckpt.load(str(tmp_path / "c"), resumed, opt2)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(opt2.state[q][key], value), key


def test_damaged_scale_runs_are_refused_by_name():
    good = (torch.tensor([0, 2048, 4096]), torch.ones(3))
    lowp.check_runs(*good, 5000, "w")
    for starts, scales in [
        (torch.tensor([1, 2048, 4096]), torch.ones(3)),  # not from 0
        (torch.tensor([0, 4096, 2048]), torch.ones(3)),  # not increasing
        (torch.tensor([0, 2048, 5000]), torch.ones(3)),  # past the end
        (torch.tensor([0, 2048]), torch.ones(3)),  # one scale per run
        (torch.tensor([0.0, 2048.0, 4096.0]), torch.ones(3)),  # int64 starts
    ]:
        with pytest.raises(
            ValueError, match=r"int8 momentum of w \(5000 elements\) needs a table of scale runs"
        ):
            lowp.check_runs(starts, scales, 5000, "w")
    # The same runs as a piece's own blocks, or not: a piece at 2048 of 2952 elements.
    assert lowp.runs_match(good[0], 5000, 2048, 2952) == slice(1, 3)
    assert lowp.runs_match(good[0], 5000, 2048, 2000) is None  # ends inside a run
    assert lowp.runs_match(good[0], 5000, 1000, 4000) is None


def test_train_job_takes_momentum_dtype(tmp_path):
    from sai_dist.train.config import TrainConfig
    from sai_dist.train.loop import train
    from tests.support.job_runs import tiny_train_config

    cfg = tiny_train_config(
        tmp_path, "lowp", steps=4, warmup_steps=1, eval_every=2, ckpt_every=2, lr=0.5, momentum_dtype="int8"
    )
    summary = train(cfg, None)
    assert math.isfinite(summary["final_val_loss"])
    with pytest.raises(ValueError, match="--momentum-dtype"):
        TrainConfig(momentum_dtype="int4").validate()


# -- the native kernel against the torch reference ----------------------------------------------


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16, torch.int8, None])
@pytest.mark.parametrize("maximize", [False, True])
def test_native_kernel_matches_torch_reference(param_dtype, buf_dtype, maximize):
    from sai_dist import native_lowp

    if native_lowp.library() is None:
        pytest.skip(f"no native kernel: {native_lowp._reason}")
    n = 5000  # two full blocks and a short one

    def run(fused):
        torch.manual_seed(0)
        p = torch.randn(n).to(param_dtype)
        buf = None if buf_dtype is None else torch.empty(n, dtype=buf_dtype)
        sc = torch.zeros(lowp.num_scales([n])) if buf_dtype == torch.int8 else None
        for t in range(3):
            g = (torch.randn(n, generator=torch.Generator().manual_seed(t)) * 1e-2).to(param_dtype)
            sgd_sai(
                [p],
                [g],
                [buf],
                [0.8],
                lr=0.3,
                momentum=0.0 if buf is None else 0.9,
                weight_decay=0.01,
                maximize=maximize,
                fused=fused,
                born=[t == 0],
                momentum_scales=[sc],
                rounding=[lowp.Rounding(1, t, 0, 100)],
            )
        return p, buf, sc

    kp, kb, ks = run(None)
    rp, rb, rs = run(False)
    # Same random bits; float32 arithmetic may differ in the last bit (torch fuses a
    # multiply-add), moving a rare stochastic rounding across its threshold by one unit.
    unit = 2.0**-7 if param_dtype == torch.bfloat16 else 2.0**-22
    gap = (kp.float() - rp.float()).abs() / rp.float().abs().clamp_min(1e-2)
    assert float(gap.max()) <= 2 * unit
    if param_dtype == torch.bfloat16:  # float32 values differ in the last bits everywhere
        assert float((kp == rp).float().mean()) > 0.99
    if kb is not None:
        if buf_dtype == torch.int8:
            torch.testing.assert_close(ks, rs, rtol=1e-6, atol=0)
            assert int((kb.int() - rb.int()).abs().max()) <= 1
        else:
            torch.testing.assert_close(kb.float(), rb.float(), rtol=2**-7, atol=0)
        if buf_dtype != torch.float32:
            assert float((kb == rb).float().mean()) > 0.99


def _flat_pair(momentum_dtype, pad=0):
    """One flat tensor holding a 5000-element weight (int8 under "int8") and a 10-element
    bias (float32 under the small rule) end to end, plus ``pad`` elements of padding, and
    the same two parameters stepped whole: the flat one's state must be the whole one's."""
    from sai_dist.layouts.flat_segment import FlatSegmentLayout, Segment

    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(50, 100)), nn.Parameter(torch.randn(10))
    flat = nn.Parameter(torch.cat([w.detach().reshape(-1), b.detach(), torch.zeros(pad)]))
    layout = FlatSegmentLayout(None, [w, b], ["w", "b"], [5000, 10])
    layout.add_flat(flat, [Segment(0, 0, 5000, 0), Segment(1, 5000, 5010, 0)])
    whole = SGDSaI([w, b], lr=0.1, momentum_dtype=momentum_dtype, seed=5)
    flat_opt = SGDSaI([flat], lr=0.1, momentum_dtype=momentum_dtype, seed=5, layout=layout)
    return w, b, flat, whole, flat_opt


def _flat_steps(w, b, flat, opts, steps, start=0):
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + s)
        gw, gb = torch.randn(50, 100, generator=gen), torch.randn(10, generator=gen)
        w.grad, b.grad = gw, gb
        flat.grad = torch.cat([gw.reshape(-1), gb, torch.zeros(flat.numel() - 5010)])
        for o in opts:
            o.step()


@pytest.mark.parametrize("momentum_dtype", ["int8", "bfloat16"])
def test_flat_tensor_with_a_small_piece_equals_the_whole_parameters_bit_for_bit(momentum_dtype):
    """The small-tensor rule under a flat layout: the weight's piece in int8 codes (its
    blocks and random draws keyed on its own indices), the bias's piece in float32 in
    momentum_small; parameters and decoded momentum equal the whole-tensor run's to the bit,
    and the state bytes are momentum.state_bytes of the pieces (padding included)."""
    w, b, flat, whole, flat_opt = _flat_pair(momentum_dtype, pad=6)
    _flat_steps(w, b, flat, (whole, flat_opt), 3)
    assert torch.equal(flat.detach()[:5000], w.detach().reshape(-1))
    assert torch.equal(flat.detach()[5000:5010], b.detach())
    st = flat_opt.state[flat]
    m = st["momentum_buffer"]
    if momentum_dtype == "int8":
        assert m.dtype == torch.int8 and st["momentum_small"].dtype == torch.float32
        assert torch.equal(m[:5000], whole.state[w]["momentum_buffer"].reshape(-1))
        assert torch.equal(st["momentum_scale"], whole.state[w]["momentum_scale"])
        assert torch.equal(st["momentum_small"], whole.state[b]["momentum_buffer"])
        assert not m[5000:].any()  # codes under the small piece and the padding stay zero
    else:
        assert m.dtype == torch.bfloat16 and "momentum_small" not in st
        assert torch.equal(m[:5000], whole.state[w]["momentum_buffer"].reshape(-1))
        assert torch.equal(m[5000:5010], whole.state[b]["momentum_buffer"])
    held = sum(st[k].numel() * st[k].element_size() for k in st if k.startswith("momentum"))
    assert held == lowp.state_bytes(momentum_dtype, [5000, 10], [5000, 10], torch.float32, buffer_numel=5016)
    whole_bytes = sum(
        whole.state[p][k].numel() * whole.state[p][k].element_size()
        for p in (w, b)
        for k in whole.state[p]
        if k.startswith("momentum")
    )
    assert held == whole_bytes + 6 * m.element_size() + (10 if momentum_dtype == "int8" else 0)


def test_flat_tensor_int8_checkpoint_resumes_bit_identically_and_converts():
    w, b, flat, whole, flat_opt = _flat_pair("int8")
    _flat_steps(w, b, flat, (whole, flat_opt), 2)
    saved = copy.deepcopy(flat_opt.state_dict())
    flat_before = flat.detach().clone()
    _flat_steps(w, b, flat, (flat_opt,), 2, start=2)
    after = flat.detach().clone()
    # Same storage: resumes to the bit.
    flat.data.copy_(flat_before)
    fresh = SGDSaI([flat], lr=0.1, momentum_dtype="int8", seed=5, layout=flat_opt.layout)
    fresh.load_state_dict(copy.deepcopy(saved))
    assert set(fresh.state[flat]) == set(saved["state"][0])
    _flat_steps(w, b, flat, (fresh,), 2, start=2)
    assert torch.equal(flat.detach(), after)
    # Into float32 momentum: every piece decoded where it was kept, exactly.
    as_fp32 = SGDSaI([flat], lr=0.1, momentum_dtype="float32", seed=5, layout=flat_opt.layout)
    as_fp32.load_state_dict(copy.deepcopy(saved))
    m32 = as_fp32.state[flat]["momentum_buffer"]
    st = saved["state"][0]
    assert m32.dtype == torch.float32 and "momentum_small" not in as_fp32.state[flat]
    assert torch.equal(m32[:5000], lowp.decode(st["momentum_buffer"][:5000], st["momentum_scale"]))
    assert torch.equal(m32[5000:5010], st["momentum_small"])
    # A momentum_small of the wrong size is refused by name, nothing loaded.
    bad = copy.deepcopy(saved)
    bad["state"][0]["momentum_small"] = torch.zeros(9)
    with pytest.raises(ValueError, match=r"momentum_small of 10 elements"):
        SGDSaI([flat], momentum_dtype="int8", layout=flat_opt.layout).load_state_dict(bad)


def test_deepspeed_config_takes_the_keywords():
    from sai_dist.deepspeed import check_config_params

    check_config_params({"lr": 0.1, "momentum_dtype": "int8", "stochastic_rounding": True, "seed": 3})
    with pytest.raises(ValueError, match="momentum_dtype: 'int4'"):
        check_config_params({"momentum_dtype": "int4"})


def test_non_contiguous_parameter_with_int8_momentum_matches_contiguous():
    torch.manual_seed(0)
    base = torch.randn(100, 60)
    a = nn.Parameter(base.clone())  # contiguous
    t = nn.Parameter(base.t().contiguous().t())  # same values, column-major strides
    opts = [SGDSaI([a], momentum_dtype="int8", seed=2), SGDSaI([t], momentum_dtype="int8", seed=2)]
    for s in range(3):
        g = torch.randn(100, 60, generator=torch.Generator().manual_seed(s))
        a.grad, t.grad = g.clone(), g.t().contiguous().t()
        for o in opts:
            o.step()
    # The contiguous one takes the native kernel, the strided one the torch reference: the
    # same random bits and block layout (logical order), float32 arithmetic to the last bit.
    torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-6)
    ca, ct = (o.state[p]["momentum_buffer"].int() for o, p in zip(opts, (a, t), strict=True))
    assert opts[1].state[t]["momentum_buffer"].is_contiguous()
    assert int((ca - ct).abs().max()) <= 1 and float((ca == ct).float().mean()) > 0.99
