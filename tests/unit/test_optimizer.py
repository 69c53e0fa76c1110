"""Single-process SGDSaI against the independent reference in tests/support/reference.py."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from sai_dist import SGDSaI, gsnr_table
from sai_dist.layouts import LayoutError
from tests.support.models import TinyTransformer, batches, lm_loss, param_groups
from tests.support.reference import ReferenceSGDSaI

GROUP_DEFAULTS = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, eps=1e-8, maximize=False)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _reference_groups(groups: list[dict], defaults: dict) -> list[dict]:
    return [{**defaults, **g} for g in groups]


@pytest.mark.parametrize(
    "normalize,maximize,foreach,weight_decay,fused",
    [
        (True, False, False, 1e-2, False),
        (True, False, True, 1e-2, False),
        (False, False, False, 1e-2, None),
        (True, True, True, 0.0, None),
        (False, True, False, 0.3, False),
    ],
)
def test_trajectory_matches_reference_50_steps(normalize, maximize, foreach, weight_decay, fused):
    torch.manual_seed(0)
    model = TinyTransformer()
    ref_model = copy.deepcopy(model)
    defaults = {**GROUP_DEFAULTS, "weight_decay": weight_decay, "maximize": maximize}
    opt = SGDSaI(
        param_groups(model),
        lr=defaults["lr"],
        weight_decay=weight_decay,
        normalize=normalize,
        maximize=maximize,
        foreach=foreach,
        fused=fused,
    )
    ref = ReferenceSGDSaI(_reference_groups(param_groups(ref_model), defaults), normalize=normalize)
    sign = -1.0 if maximize else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1-element gate warns once
        for idx in batches(50):
            for m, o in ((model, opt), (ref_model, ref)):
                loss = sign * lm_loss(m, idx)
                loss.backward()
                o.step()
                for p in m.parameters():
                    p.grad = None
    worst = max(_max_rel(p, q) for p, q in zip(model.parameters(), ref_model.parameters(), strict=True))
    assert worst < 1e-6, worst
    table = gsnr_table(model, opt)
    names = dict(ref_model.named_parameters())
    for name, row in table.items():
        assert row["gsnr"] == pytest.approx(ref.gsnr[names[name]], rel=1e-6)
        assert row["scale"] == pytest.approx(ref.scale[names[name]], rel=1e-6)
        assert row["numel"] == names[name].numel()
    assert max(r["scale"] for r in table.values()) == pytest.approx(
        1.0 if normalize else max(ref.gsnr.values())
    )


def test_momentum_zero_is_scaled_sgd():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(10))
    q = nn.Parameter(p.detach().clone())
    opt = SGDSaI([p], lr=0.1, momentum=0.0, weight_decay=0.0)
    ref = ReferenceSGDSaI(
        [{"params": [q], **GROUP_DEFAULTS, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}]
    )
    for _ in range(3):
        g = torch.randn(10)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert "momentum_buffer" not in opt.state[p]
    torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


def _two_params():
    torch.manual_seed(2)
    return nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(1))


def test_one_element_block_policy_max_warns_and_gets_unit_scale():
    w, s = _two_params()
    opt = SGDSaI([("layer.weight", w), ("gate", s)], lr=0.1)
    w.grad, s.grad = torch.randn(6, 5), torch.tensor([3.0])
    with pytest.warns(UserWarning, match="gate"):
        opt.step()
    assert float(opt.state[s]["scale"]) == 1.0
    assert float(opt.state[w]["scale"]) == 1.0  # the only regular block is the max
    assert float(opt.state[s]["gsnr"]) == pytest.approx(float(opt.state[w]["gsnr"]))


def test_one_element_block_policy_official_reproduces_official_formula():
    w, s = _two_params()
    opt = SGDSaI([w, s], lr=0.1, degenerate="official")
    gw = torch.randn(6, 5)
    w.grad, s.grad = gw.clone(), torch.tensor([3.0])
    opt.step()
    official_w = (gw.norm() / (gw.std() + 1e-8)).item()
    official_s = 3.0 / 1e-8
    assert float(opt.state[s]["gsnr"]) == pytest.approx(official_s, rel=1e-6)
    assert float(opt.state[w]["scale"]) == pytest.approx(official_w / official_s, rel=1e-5)


def test_all_zero_block_is_not_frozen_by_default():
    w, _ = _two_params()
    z = nn.Parameter(torch.ones(4, 4))
    opt = SGDSaI([("w", w), ("z", z)], lr=0.1)
    w.grad, z.grad = torch.randn(6, 5), torch.zeros(4, 4)
    with pytest.warns(UserWarning, match="z"):
        opt.step()
    assert float(opt.state[z]["scale"]) == 1.0
    official = SGDSaI([w, z], lr=0.1, degenerate="official")
    official.step()
    assert float(official.state[z]["scale"]) == 0.0


def test_late_block_gets_gsnr_at_first_gradient_scaled_by_step1_max():
    torch.manual_seed(3)
    a, b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(5, 3))
    opt = SGDSaI([a, b], lr=0.1)
    a.grad = torch.randn(8)
    opt.step()
    gmax = float(opt.state[a]["gsnr_max"])
    assert "gsnr" not in opt.state[b]
    gb = torch.randn(5, 3) * 4 + 1
    a.grad, b.grad = torch.randn(8), gb.clone()
    opt.step()
    expected = (gb.norm() / (gb.std() + 1e-8)).item()
    assert float(opt.state[b]["gsnr"]) == pytest.approx(expected, rel=1e-6)
    assert float(opt.state[b]["scale"]) == pytest.approx(expected / gmax, rel=1e-6)
    assert float(opt.state[a]["gsnr_max"]) == gmax


def test_all_zero_first_step_is_skipped_without_side_effects():
    w, _ = _two_params()
    before = w.detach().clone()
    opt = SGDSaI([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros_like(w)
    with pytest.warns(UserWarning, match="every gradient is zero"):
        opt.step()
    assert not opt.initialized and len(opt.state) == 0
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,culprit",
    [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"eps": -1.0}, "eps"),
        ({"degenerate": "ignore"}, "degenerate"),
        ({"normalize": "yes"}, "normalize"),
        ({"maximize": 1}, "maximize"),
        ({"fused": "yes"}, "fused"),
        ({"foreach": 1}, "foreach"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        SGDSaI([nn.Parameter(torch.zeros(2))], **kwargs)


def test_invalid_group_hyperparameter_leaves_groups_unchanged():
    opt = SGDSaI([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "momentum": 2.0})
    assert len(opt.param_groups) == 1


def test_sparse_gradient_is_refused_and_nothing_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = SGDSaI(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    torch.testing.assert_close(emb.weight.detach(), before, rtol=0, atol=0)
    assert len(opt.state) == 0


def test_non_finite_gradient_at_gsnr_step_names_parameters_and_changes_nothing():
    w, s = _two_params()
    opt = SGDSaI([("encoder.weight", w), ("gate", s)], lr=0.1)
    before = w.detach().clone()
    g = torch.randn(6, 5)
    g[2, 3] = math.inf
    w.grad, s.grad = g, torch.tensor([1.0])
    with pytest.raises(RuntimeError, match=r"non-finite.*encoder\.weight"):
        opt.step()
    assert not opt.initialized and len(opt.state) == 0
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)


def test_tensor_never_given_is_refused():
    w, _ = _two_params()
    opt = SGDSaI([w])
    flat = nn.Parameter(torch.randn(30))
    flat.grad = torch.randn(30)
    opt.param_groups[0]["params"] = [flat]  # what a sharding wrapper that rebinds groups does
    with pytest.raises(LayoutError, match="never given"):
        opt.step()
    assert len(opt.state) == 0


def test_fsdp1_flattened_parameter_is_refused():
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    p = nn.Parameter(torch.randn(12))
    _set_fsdp_flattened(p)
    with pytest.raises(LayoutError, match="FSDP1"):
        SGDSaI([p])


def _train(model, opt, data, scheduler=None):
    losses = []
    for idx in data:
        loss = lm_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_then_continued_training_equals_uninterrupted(tmp_path):
    torch.manual_seed(4)
    data = batches(12, seed=4)
    model = TinyTransformer()
    resumed_model = copy.deepcopy(model)

    opt = SGDSaI(param_groups(model), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(model, opt, data[:5], sched)
        path = tmp_path / "ckpt.pt"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path)
        uninterrupted = _train(model, opt, data[5:], sched)

        ckpt = torch.load(path, weights_only=True)
        resumed_model.load_state_dict(ckpt["model"])
        opt2 = SGDSaI(param_groups(resumed_model), lr=0.05)
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
        opt2.load_state_dict(ckpt["opt"])
        sched2.load_state_dict(ckpt["sched"])
        assert opt2.initialized
        resumed = _train(resumed_model, opt2, data[5:], sched2)
    assert resumed == uninterrupted
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_loaded_state_never_recomputes_gsnr():
    w, _ = _two_params()
    opt = SGDSaI([w], lr=0.1)
    w.grad = torch.randn(6, 5)
    opt.step()
    sd = opt.state_dict()
    w2 = nn.Parameter(w.detach().clone())
    opt2 = SGDSaI([w2], lr=0.1)
    opt2.load_state_dict(sd)
    w2.grad = torch.randn(6, 5) * 10 + 3
    opt2.step()
    assert float(opt2.state[w2]["gsnr"]) == float(opt.state[w]["gsnr"])


def test_bf16_parameter_keeps_float32_scales_through_load():
    p = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = SGDSaI([p])
    p.grad = torch.randn(64, dtype=torch.bfloat16) + 0.3
    opt.step()
    sd = opt.state_dict()
    opt2 = SGDSaI([nn.Parameter(p.detach().clone())])
    opt2.load_state_dict(sd)
    state = next(iter(opt2.state.values()))
    assert state["gsnr"].dtype == torch.float32 and state["gsnr"].device.type == "cpu"
    assert float(state["gsnr"]) == float(opt.state[p]["gsnr"])
    assert state["momentum_buffer"].dtype == torch.bfloat16


def test_grad_scaler_and_clipping_see_unscaled_clipped_gradients():
    """g-SNR is computed from the gradient exactly as step() sees it: unscaled, clipped."""
    torch.manual_seed(5)
    data = batches(6, seed=5)
    model = TinyTransformer()
    plain_model = copy.deepcopy(model)
    opt = SGDSaI(model.parameters(), lr=0.05)
    plain = SGDSaI(plain_model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for idx in data:
            scaler.scale(lm_loss(model, idx)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()

            lm_loss(plain_model, idx).backward()
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 0.5)
            plain.step()
            plain.zero_grad()
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert _max_rel(p.detach(), q.detach()) < 1e-5
    a, b = gsnr_table(model, opt), gsnr_table(plain_model, plain)
    for name in a:
        assert a[name]["gsnr"] == pytest.approx(b[name]["gsnr"], rel=1e-5)


def test_grad_scaler_overflow_at_first_step_does_not_fix_gsnr():
    torch.manual_seed(6)
    lin = nn.Linear(4, 4)
    opt = SGDSaI(lin.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    loss = lin(torch.randn(2, 4)).sum() * torch.tensor(math.inf)
    scaler.scale(loss).backward()
    scaler.step(opt)  # found inf: the scaler skips optimizer.step()
    scaler.update()
    assert not opt.initialized


def test_hooks_zero_grad_and_scheduler_work():
    lin = nn.Linear(3, 2)
    opt = SGDSaI(lin.parameters(), lr=0.2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    assert calls == ["pre", "post"]
    assert all(p.grad is None for p in lin.parameters())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_closure_is_called_with_grad_enabled():
    lin = nn.Linear(3, 1)
    opt = SGDSaI(lin.parameters())
    x = torch.randn(5, 3)

    def closure():
        opt.zero_grad()
        loss = lin(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and opt.initialized


@pytest.mark.parametrize("normalize", [True, False])
def test_late_degenerate_block_takes_the_step1_max(normalize):
    torch.manual_seed(7)
    a, gate = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(1))
    opt = SGDSaI([a, gate], lr=0.1, normalize=normalize)
    a.grad = torch.randn(8)
    opt.step()
    gmax = float(opt.state[a]["gsnr_max"])
    assert gmax == pytest.approx(float(opt.state[a]["gsnr"]))
    a.grad, gate.grad = torch.randn(8), torch.tensor([2.0])
    with pytest.warns(UserWarning, match="zero spread"):
        opt.step()
    assert float(opt.state[gate]["gsnr"]) == pytest.approx(gmax)
    assert float(opt.state[gate]["scale"]) == pytest.approx(1.0 if normalize else gmax)


def test_state_template_probe_gets_placeholders_and_fixes_nothing():
    """A zero-gradient step with lr 0 everywhere (DCP's / torchtitan's template probe) gets
    placeholders of the state's shapes, silently; the next real step drops them and equals
    a never-probed optimizer bit for bit (momentum starts as the first gradient)."""
    import warnings

    w, s = _two_params()
    w2, s2 = (nn.Parameter(t.detach().clone()) for t in (w, s))
    opt, plain = SGDSaI([w, s], lr=0.1), SGDSaI([w2, s2], lr=0.1)
    opt.param_groups[0]["lr"] = 0.0
    w.grad, s.grad = torch.zeros_like(w), torch.zeros_like(s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert not opt.initialized
    assert set(opt.state[w]) == {"momentum_buffer", "gsnr", "scale", "gsnr_max"}
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.zeros_like(w))
    assert opt.state[w]["gsnr_max"].isnan()
    opt.param_groups[0]["lr"] = 0.1
    for _ in range(3):
        g1, g2 = torch.randn_like(w), torch.randn_like(s)
        w.grad, s.grad, w2.grad, s2.grad = g1, g2, g1.clone(), g2.clone()
        opt.step()
        plain.step()
    assert torch.equal(w, w2) and torch.equal(s, s2)
    assert float(opt.state[w]["gsnr"]) == float(plain.state[w2]["gsnr"])


def test_fresh_empty_state_loads_without_warning():
    import warnings

    w, s = _two_params()
    opt = SGDSaI([w, s])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(SGDSaI([w, s]).state_dict())
    assert not opt.initialized
