"""The bad-input matrix of docs/input_validation.md, item by item.

Every refusal asserts its message (naming the culprit) and that nothing was modified:
parameters, gradients, optimizer state and param groups exactly as before. The
cross-rank cases run in one 3-rank gloo launch (tests/distributed/bad_input_ranks.py); every rank
must raise, so each is checked on all three.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from sai_dist import SGDSaI
from tests.distributed import bad_input_ranks
from tests.support.ranks import run_ranks

needs_ds = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def snapshot(opt: SGDSaI) -> dict[str, Any]:
    """Deep copy of everything a refused call must leave as it was."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "state": copy.deepcopy(opt.state_dict()),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "sizes": [len(g["params"]) for g in opt.param_groups],
        "blocks": opt.layout.num_blocks,
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN equal to NaN."""
    a, b = a.to_dense(), b.to_dense()
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def assert_unchanged(before: dict[str, Any], opt: SGDSaI) -> None:
    after = snapshot(opt)
    assert after["sizes"] == before["sizes"] and after["groups"] == before["groups"]
    assert after["blocks"] == before["blocks"]
    for a, b in zip(before["params"], after["params"], strict=True):
        assert same(a, b)
    for a, b in zip(before["grads"], after["grads"], strict=True):
        assert (a is None and b is None) or same(a, b)
    assert before["state"]["state"].keys() == after["state"]["state"].keys()
    for key, entry in before["state"]["state"].items():
        assert entry.keys() == after["state"]["state"][key].keys()
        for k, v in entry.items():
            assert same(torch.as_tensor(v), torch.as_tensor(after["state"]["state"][key][k]))


def trained(seed: int = 0, **kw: Any) -> tuple[nn.Parameter, nn.Parameter, SGDSaI]:
    """Two named parameters ``w`` and ``b`` in two groups, and an optimizer one step in
    (g-SNR fixed). Groups added later must be named too (torch's rule)."""
    g = torch.Generator().manual_seed(seed)
    w, b = nn.Parameter(torch.randn(4, 3, generator=g)), nn.Parameter(torch.randn(5, generator=g))
    opt = SGDSaI([{"params": [("w", w)]}, {"params": [("b", b)], "weight_decay": 0.0}], lr=0.1, **kw)
    w.grad, b.grad = torch.randn(4, 3, generator=g), torch.randn(5, generator=g) + 1
    opt.step()
    return w, b, opt


def gsnr(g: torch.Tensor, eps: float = 1e-8) -> float:
    """Independent g-SNR of a whole tensor, float64."""
    g = g.double()
    return float(g.norm() / (g.std() + eps))


# -- 1. invalid hyperparameters (Python) -----------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1.0}, r"Invalid lr: -1.0 \(must be >= 0.0\)"),
        ({"lr": math.nan}, r"Invalid lr: nan \(must be finite\)"),
        ({"lr": math.inf}, r"Invalid lr: inf \(must be finite\)"),
        ({"lr": "0.1"}, r"Invalid lr: '0.1' \(must be a real number, got str\)"),
        ({"lr": True}, r"Invalid lr: True \(must be a real number, got bool\)"),
        ({"lr": torch.tensor(0.1)}, r"Invalid lr: lr must be a Python float, got a Tensor"),
        ({"momentum": 1.0}, r"Invalid momentum: 1.0 \(must be >= 0.0 and < 1.0\)"),
        ({"momentum": -0.1}, r"Invalid momentum: -0.1"),
        ({"momentum": math.nan}, r"Invalid momentum: nan \(must be finite\)"),
        ({"weight_decay": -1e-3}, r"Invalid weight_decay: -0.001"),
        ({"weight_decay": math.inf}, r"Invalid weight_decay: inf"),
        ({"eps": 0.0}, r"Invalid eps: 0.0 \(must be > 0.0\)"),
        ({"eps": -1.0}, r"Invalid eps: -1.0"),
        ({"degenerate": "ignore"}, r"Invalid degenerate: 'ignore' \(must be one of \('max', 'official'\)\)"),
        ({"normalize": "yes"}, r"Invalid normalize: 'yes' \(must be a bool\)"),
        ({"check_ranks": 1}, r"Invalid check_ranks: 1 \(must be a bool\)"),
        ({"maximize": 1}, r"Invalid maximize: 1 \(must be a bool\)"),
        ({"fused": 1}, r"Invalid fused: 1 \(must be None or a bool\)"),
        ({"foreach": "yes"}, r"Invalid foreach: 'yes' \(must be None or a bool\)"),
    ],
)
def test_invalid_hyperparameter_is_refused_naming_it(kwargs, message):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=message):
        SGDSaI([p], **kwargs)


def test_invalid_group_added_after_step_1_changes_nothing():
    opt = trained()[2]
    before = snapshot(opt)
    extra = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"Invalid lr: nan \(must be finite\) in param group 2"):
        opt.add_param_group({"params": [("extra", extra)], "lr": math.nan})
    assert_unchanged(before, opt)


# -- 2. unknown keys: Python param groups and the DeepSpeed config ----------------------


def test_param_group_key_typo_is_refused_and_changes_nothing():
    opt = trained()[2]
    before = snapshot(opt)
    with pytest.raises(
        ValueError, match=r"Unknown param-group key 'momentun' in param group 2: did you mean 'momentum'"
    ):
        opt.add_param_group({"params": [("x", nn.Parameter(torch.ones(3)))], "momentun": 0.5})
    with pytest.raises(ValueError, match=r"'weight_deacy' in param group 0: did you mean 'weight_decay'"):
        SGDSaI([{"params": [nn.Parameter(torch.ones(3))], "weight_deacy": 0.1}])
    with pytest.raises(ValueError, match=r"'nesterov' in param group 0: SGDSaI does not implement"):
        SGDSaI([{"params": [nn.Parameter(torch.ones(3))], "nesterov": True}])
    assert_unchanged(before, opt)
    # Keys of schedulers and frameworks stay allowed, as in torch.optim.
    SGDSaI([{"params": [nn.Parameter(torch.ones(3))], "initial_lr": 0.1, "name": "head", "nesterov": False}])


@needs_ds
@pytest.mark.parametrize(
    "params,message",
    [
        ({"momentun": 0.9}, r"unknown key\(s\) 'momentun' \(did you mean 'momentum'\?\)"),
        ({"lr": 0.1, "weight_deacy": 0.1}, r"'weight_deacy' \(did you mean 'weight_decay'\?\)"),
        ({"max_grad_norm": 1.0}, r"'max_grad_norm' \(clip with DeepSpeed's top-level \"gradient_clipping\""),
        ({"betas": [0.9, 0.99]}, r"'betas' \(Adam's betas have no counterpart"),
        ({"lr": -0.1}, r"Invalid lr: -0.1 \(must be >= 0.0\)"),
        ({"eps": 0}, r"Invalid eps: 0 \(must be > 0.0\)"),
        ({"momentum": 1.5}, r"Invalid momentum: 1.5"),
        ({"degenerate": "none"}, r"Invalid degenerate: 'none'"),
        ([0.1], r"params must be a JSON object, got list"),
    ],
)
def test_deepspeed_config_params_are_validated(params, message):
    from sai_dist.deepspeed import check_config_params

    with pytest.raises(ValueError, match=message):
        check_config_params(params)


@needs_ds
def test_deepspeed_initialize_refuses_a_typo_before_building_anything(monkeypatch):
    import deepspeed

    import sai_dist.deepspeed as sds

    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    called = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: called.append(kw))
    cfg = {"train_batch_size": 2, "optimizer": {"type": "sgdsai", "params": {"lr": 0.1, "momentun": 0.9}}}
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'momentun' \(did you mean 'momentum'\?\)"):
        sds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert called == []  # DeepSpeed was never asked to build an engine
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@needs_ds
def test_deepspeed_engine_hook_refuses_a_typo_for_direct_deepspeed_initialize():
    """Users who call deepspeed.initialize themselves go through the engine hook, which
    validates before DeepSpeed evaluates SGDSaI(model_parameters, **params)."""
    import deepspeed

    import sai_dist.deepspeed  # noqa: F401  (installs the hook)

    fake = SimpleNamespace(optimizer_name=lambda: "SGDSaI", optimizer_params=lambda: {"momentun": 0.9})
    with pytest.raises(ValueError, match=r"'momentun' \(did you mean 'momentum'\?\)"):
        deepspeed.runtime.engine.DeepSpeedEngine._configure_optimizer(fake, None, [])


# -- 3. sparse and complex -----------------------------------------------------------


def test_sparse_gradient_is_refused_naming_it_and_changes_nothing():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SGDSaI(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = snapshot(opt)
    with pytest.raises(
        RuntimeError, match=r"does not support sparse gradients \(tensor of shape \(10, 4\)\)"
    ):
        opt.step()
    assert_unchanged(before, opt)
    assert not opt.initialized


def test_complex_parameter_is_refused_naming_it():
    real, cplx = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "complex parameters: param_groups[0]['params'][1] (rot), shape (2, 2), dtype torch.complex64"
        ),
    ):
        SGDSaI([("w", real), ("rot", cplx)])
    opt = trained()[2]
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"complex parameters: param_groups\[2\]\['params'\]\[0\] \(late\)"):
        opt.add_param_group({"params": [("late", cplx)]})
    assert_unchanged(before, opt)


def test_complex_gradient_swapped_in_by_a_wrapper_is_refused():
    w, _, opt = trained()
    state = copy.deepcopy(opt.state[w])
    cplx = nn.Parameter(torch.ones(4, dtype=torch.complex64))
    cplx.grad = torch.ones(4, dtype=torch.complex64)
    opt.param_groups[0]["params"] = [cplx]  # what a wrapper that rebinds groups does
    with pytest.raises(
        RuntimeError, match=r"complex gradients \(tensor of shape \(4,\), gradient dtype torch.complex64\)"
    ):
        opt.step()
    assert torch.equal(cplx.detach(), torch.ones(4, dtype=torch.complex64)) and cplx not in opt.state
    assert all(torch.equal(v, opt.state[w][k]) for k, v in state.items())


# -- 4. non-finite gradients -----------------------------------------------------------


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_gradient_at_step_1_is_refused_and_step_2_fixes_gsnr(bad):
    g = torch.Generator().manual_seed(1)
    w, b = nn.Parameter(torch.randn(4, 3, generator=g)), nn.Parameter(torch.randn(5, generator=g))
    opt = SGDSaI([("w", w), ("b", b)], lr=0.1)
    w.grad, b.grad = torch.randn(4, 3, generator=g), torch.randn(5, generator=g)
    b.grad[3] = bad
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"non-finite gradient \(inf or NaN\) at the g-SNR step in b;"):
        opt.step()
    assert_unchanged(before, opt)
    assert not opt.initialized
    # The next finite gradient fixes g-SNR, from that gradient only.
    b.grad = torch.randn(5, generator=g) + 1
    opt.step()
    assert float(opt.state[w]["gsnr"]) == pytest.approx(gsnr(w.grad), rel=1e-6)
    assert float(opt.state[b]["gsnr"]) == pytest.approx(gsnr(b.grad), rel=1e-6)


def test_non_finite_gradient_after_step_1_follows_torch_optim():
    """After step 1 gradients are not inspected (as in torch.optim): a NaN reaches exactly
    the elements it touches, through the usual update."""
    w, b, opt = trained()
    scale, m = float(opt.state[w]["scale"]), opt.state[w]["momentum_buffer"].clone()
    p0 = w.detach().clone()
    grad = torch.ones(4, 3)
    grad[1, 2] = math.nan
    w.grad, b.grad = grad, torch.ones(5)
    opt.step()  # no error
    m_new = 0.9 * m + 0.1 * grad
    expected = p0 * (1 - 0.1 * 1e-2) - 0.1 * scale * m_new
    assert torch.isnan(w[1, 2]) and torch.isfinite(w.detach()).sum() == 11
    mask = torch.isfinite(expected)
    torch.testing.assert_close(w.detach()[mask], expected[mask], rtol=1e-6, atol=1e-7)


def test_grad_scaler_skips_an_inf_first_step_and_matches_an_unscaled_run():
    """The scaler skips step() on inf (nothing fixed); g-SNR is fixed at the first finite
    step from unscaled gradients; the trajectory equals a run that never saw the inf."""
    torch.manual_seed(2)
    scaled_model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    plain_model = copy.deepcopy(scaled_model)
    opt = SGDSaI(scaled_model.parameters(), lr=0.05)
    plain = SGDSaI(plain_model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    data = [(torch.randn(8, 6), torch.randn(8, 3)) for _ in range(6)]

    x, y = data[0]
    before = snapshot(opt)
    loss = (scaled_model(x) - y).square().mean() * torch.tensor(math.inf)
    scaler.scale(loss).backward()
    scaler.step(opt)  # found inf: skipped
    scaler.update()
    opt.zero_grad()
    assert not opt.initialized and scaler.get_scale() == 2.0**13
    assert all(torch.equal(a, p) for a, p in zip(before["params"], scaled_model.parameters(), strict=True))

    first_gsnr = None
    for step, (x, y) in enumerate(data[1:]):
        scaler.scale((scaled_model(x) - y).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        (plain_model(x) - y).square().mean().backward()
        plain.step()
        if step == 0:
            first_gsnr = [gsnr(p.grad) for p in plain_model.parameters()]
        opt.zero_grad()
        plain.zero_grad()
    for p, q in zip(scaled_model.parameters(), plain_model.parameters(), strict=True):
        assert float(opt.state[p]["gsnr"]) == float(plain.state[q]["gsnr"])  # power-of-2 scale: exact
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    got = [float(opt.state[p]["gsnr"]) for p in scaled_model.parameters()]
    assert got == pytest.approx(first_gsnr, rel=1e-6)  # fixed at the first finite step


# -- 5. a checkpoint from a different model ---------------------------------------------


def _other_state(shapes: list[tuple[int, ...]], groups: int = 2) -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    params = [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    split = [{"params": params[:1]}, {"params": params[1:]}] if groups == 2 else [{"params": params}]
    opt = SGDSaI(split, lr=0.1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) + 0.5
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize(
    "state_dict,message",
    [
        (
            lambda: _other_state([(3, 4), (5,)]),
            re.escape(
                "momentum_buffer of param_groups[0]['params'][0] (w) has shape (3, 4), the parameter (4, 3)"
            ),
        ),
        (lambda: _other_state([(4, 3), (5,)], groups=1), r"it has 1 param groups, this optimizer 2"),
        (lambda: _other_state([(4, 3), (5,), (2,)]), r"param group 1 has 2 parameters in it, 1 here"),
    ],
)
def test_checkpoint_of_another_model_is_refused_and_changes_nothing(state_dict, message):
    opt = trained()[2]
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"the state dict is not this optimizer's .*" + message):
        opt.load_state_dict(state_dict())
    assert_unchanged(before, opt)


def test_checkpoint_with_invalid_hyperparameters_or_two_gsnr_max_is_refused():
    opt = trained()[2]
    before = snapshot(opt)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][1]["momentum"] = 1.0
    with pytest.raises(
        ValueError, match=r"Invalid momentum: 1.0 \(must be >= 0.0 and < 1.0\) in param group 1"
    ):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["gsnr_max"] = torch.tensor(123.0)  # stitched together from two runs
    with pytest.raises(ValueError, match=r"2 different gsnr_max values"):
        opt.load_state_dict(sd)
    assert_unchanged(before, opt)


# -- 6. frozen parameters and parameters added after step 1 -----------------------------


def test_frozen_parameter_is_skipped_then_unfrozen_as_a_late_block():
    g = torch.Generator().manual_seed(7)
    w, frozen = nn.Parameter(torch.randn(4, 3, generator=g)), nn.Parameter(torch.randn(6, generator=g))
    frozen.requires_grad_(False)
    kept = frozen.detach().clone()
    opt = SGDSaI([("w", w), ("frozen", frozen)], lr=0.1)
    for _ in range(2):
        w.grad = torch.randn(4, 3, generator=g)
        opt.step()
    assert frozen not in opt.state and torch.equal(frozen, kept)
    gmax = float(opt.state[w]["gsnr_max"])
    frozen.requires_grad_(True)
    late_grad = torch.randn(6, generator=g) * 2 + 1
    w.grad, frozen.grad = torch.randn(4, 3, generator=g), late_grad.clone()
    opt.step()
    assert float(opt.state[frozen]["gsnr"]) == pytest.approx(gsnr(late_grad), rel=1e-6)
    assert float(opt.state[frozen]["scale"]) == pytest.approx(gsnr(late_grad) / gmax, rel=1e-6)
    assert float(opt.state[w]["gsnr_max"]) == gmax  # the step-1 max is never recomputed


def test_param_group_added_after_step_1_uses_its_own_eps_and_the_step_1_max():
    w, b, opt = trained()
    gmax = float(opt.state[w]["gsnr_max"])
    late = nn.Parameter(torch.zeros(3, 3))
    opt.add_param_group({"params": [("late", late)], "eps": 0.5, "lr": 0.01})
    grad = torch.tensor([[1.0, 2.0, 0.5], [0.1, 0.2, 0.3], [3.0, 1.0, 2.0]])
    w.grad, b.grad, late.grad = torch.ones(4, 3), torch.ones(5), grad.clone()
    opt.step()
    assert float(opt.state[late]["gsnr"]) == pytest.approx(gsnr(grad, eps=0.5), rel=1e-6)
    assert float(opt.state[late]["scale"]) == pytest.approx(gsnr(grad, eps=0.5) / gmax, rel=1e-6)


# -- 7. across ranks: consistency, ranks with no parameters, uneven world sizes ----------


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_ranks(bad_input_ranks.launch, 3, timeout=300)


def every_rank(ranks: list[dict[str, Any]], part: str, case: str, *patterns: str) -> None:
    """Every rank raised RankMismatchError with the same message matching ``patterns``,
    and changed nothing."""
    results = [r[part][case] for r in ranks]
    assert len({r["error"] for r in results}) == 1, [r["error"] for r in results]
    error = results[0]["error"]
    assert error.startswith("RankMismatchError: SGDSaI: the 3 ranks disagree at"), error
    for pattern in patterns:
        assert re.search(pattern, error), (pattern, error)
    assert all(r["unchanged"] for r in results)


@pytest.mark.distributed
def test_hyperparameter_edited_on_one_rank(ranks):
    every_rank(
        ranks,
        "replicated",
        "lr",
        r"at the g-SNR step \(step 1\)",
        re.escape("param_groups[0]['lr']: 0.1 on ranks [0, 2]; 0.2 on rank 1"),
    )


@pytest.mark.distributed
def test_momentum_edited_on_one_rank_of_a_sharded_model(ranks):
    every_rank(
        ranks,
        "dtensor",
        "momentum",
        re.escape("param_groups[0]['momentum']: 0.8 on rank 0; 0.9 on ranks [1, 2]"),
    )


@pytest.mark.distributed
def test_divergent_replica_gradients(ranks):
    every_rank(
        ranks,
        "replicated",
        "grads",
        re.escape("values['gradient statistics']['w']['sum']: ")
        + r"[-\d.e]+ on ranks \[0, 1\]; [-\d.e]+ on rank 2",
    )


@pytest.mark.distributed
def test_param_group_split_differs(ranks):
    every_rank(ranks, "replicated", "groups", re.escape("len(param_groups): 1 on rank 0; 2 on ranks [1, 2]"))


@pytest.mark.distributed
def test_different_model_on_one_rank_is_named_not_a_hang(ranks):
    every_rank(ranks, "dtensor", "model", re.escape("len(blocks): 3 on ranks [0, 1]; 4 on rank 2"))


@pytest.mark.distributed
def test_local_refusal_on_one_rank_raises_on_every_rank(ranks):
    every_rank(
        ranks,
        "replicated",
        "refusal",
        re.escape("rank 1 refused it: RuntimeError: SGDSaI does not support sparse gradients"),
    )


@pytest.mark.distributed
def test_ranks_in_different_calls_are_told_not_hung(ranks):
    every_rank(
        ranks, "replicated", "calls", re.escape("call: 'load_state_dict' on rank 0; 'step' on ranks [1, 2]")
    )


@pytest.mark.distributed
def test_checkpoint_with_another_gsnr_max_on_one_rank(ranks):
    every_rank(
        ranks,
        "replicated",
        "load_gsnr_max",
        r"at load_state_dict",
        r"gsnr_max: [\d.]+ on ranks \[0, 1\]; [\d.]+ on rank 2",
    )


@pytest.mark.distributed
def test_checkpoint_of_another_model_on_one_rank(ranks):
    every_rank(
        ranks,
        "replicated",
        "load_other_model",
        re.escape(
            "rank 1 refused it: ValueError: SGDSaI.load_state_dict: the state dict is not this optimizer's"
        ),
        re.escape("momentum_buffer of param_groups[0]['params'][0] has shape (3, 4), the parameter (4, 3)"),
    )


@pytest.mark.distributed
def test_check_ranks_false_lets_ranks_differ(ranks):
    for r in ranks:
        assert r["replicated"]["opt_out"] == {"error": "no error", "unchanged": False}


@pytest.mark.distributed
def test_consistent_ranks_pay_one_small_collective_at_step_1_only(ranks):
    for r in ranks:
        # Replicated layout (DDP): the check is the only collective, at step 1 only.
        assert r["replicated"]["replicated_counts"] == [{"dist.all_reduce": 1}, {}, {}]
        # Sharded: the check plus one batched all_reduce per statistics pass.
        assert r["dtensor"]["uneven"]["counts"] == {"dist.all_reduce": 3}


@pytest.mark.distributed
def test_uneven_and_empty_shards_give_whole_tensor_gsnr(ranks):
    """(5, 3), (2,) and (1, 4) over 3 ranks: no world-size divisibility is needed, and ranks
    whose shard is empty still join every collective."""
    assert [r["dtensor"]["uneven"]["local_numels"] for r in ranks] == [[6, 1, 4], [6, 1, 0], [3, 0, 0]]
    for r in ranks:
        u = r["dtensor"]["uneven"]
        assert u["gsnr"] == pytest.approx(u["expected"], rel=1e-6)


@pytest.mark.distributed
def test_rank_holding_only_padding_joins_and_gsnr_is_exact(ranks):
    assert [r["flat"]["segments"] for r in ranks] == [1, 2, 0]
    for r in ranks:
        assert r["flat"]["gsnr"] == pytest.approx(r["flat"]["expected"], rel=1e-6)


@pytest.mark.distributed
def test_param_group_added_after_step_1_on_a_sharded_model(ranks):
    for r in ranks:
        late = r["dtensor"]["late_same"]
        assert late["error"] == "no error" and late["counts"] == {"dist.all_reduce": 3}
        assert late["gsnr"] == pytest.approx(late["expected_gsnr"], rel=1e-6)
        assert late["scale"] == pytest.approx(late["expected_gsnr"] / late["gsnr_max"], rel=1e-6)
    every_rank(
        ranks,
        "dtensor",
        "late_lr_on_rank_1",
        r"at the first step of blocks added after step 1",
        re.escape("param_groups[1]['lr']: 0.05 on ranks [0, 2]; 0.5 on rank 1"),
    )
