"""Regression tests from a correctness review of the core (single process)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sai_dist import SGDSaI


def test_parameter_listed_twice_counts_its_gradient_once_in_gsnr():
    # torch.optim accepts a duplicated parameter (with a warning); its g-SNR must still be
    # the g-SNR of the one tensor, not of its gradient concatenated with itself.
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    other = nn.Parameter(torch.randn(5))
    grad_w, grad_o = torch.randn(4, 3), torch.randn(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dup = SGDSaI([w, w, other], momentum=0.0)
    single = SGDSaI([nn.Parameter(w.detach().clone()), nn.Parameter(other.detach().clone())], momentum=0.0)
    w.grad, other.grad = grad_w.clone(), grad_o.clone()
    for p, g in zip(single.param_groups[0]["params"], (grad_w, grad_o), strict=True):
        p.grad = g.clone()
    dup.step()
    single.step()
    expected = (grad_w.norm() / (grad_w.std() + 1e-8)).item()
    assert abs(float(dup.state[w]["gsnr"]) - expected) <= 1e-6 * expected
    assert float(dup.state[w]["gsnr"]) == float(single.state[single.param_groups[0]["params"][0]]["gsnr"])


def test_warnings_point_at_the_callers_step_line():
    p = nn.Parameter(torch.randn(5))
    opt = SGDSaI([p])
    p.grad = torch.zeros(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert [w.filename for w in caught] == [__file__]

    q = nn.Parameter(torch.randn(1))  # one element: degenerate-block warning
    opt = SGDSaI([p, q])
    p.grad, q.grad = torch.randn(5), torch.randn(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert [w.filename for w in caught] == [__file__]

    fresh = SGDSaI([p])
    # A fresh optimizer's own empty state loads silently (accelerate round-trips it); state
    # without g-SNR is what still warns.
    saved = SGDSaI([p]).state_dict()
    saved["state"][0] = {"momentum_buffer": torch.zeros(5)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(saved)
    assert [w.filename for w in caught] == [__file__]


class _OwnsModuleAttribute(nn.Module):
    """A user's model (not a wrapper) with a submodule that happens to be called
    ``module`` and a parameter of its own whose short name clashes with it."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(3, 3)
        self.weight = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) @ self.weight


class _PureWrapper(nn.Module):
    """Stands in for DDP: holds the user's model as ``module`` and nothing else."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_gsnr_table_keeps_a_users_submodule_called_module():
    from sai_dist import gsnr_table

    torch.manual_seed(0)
    model = _OwnsModuleAttribute()
    opt = SGDSaI(model.parameters())
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    names = {"module.weight", "module.bias", "weight"}
    assert set(gsnr_table(model, opt)) == names
    # Wrapper prefixes still go: DDP-style ``module.`` and torch.compile's ``_orig_mod.``.
    assert set(gsnr_table(_PureWrapper(model), opt)) == names
    assert set(gsnr_table(torch.compile(_PureWrapper(model)), opt)) == names
    table = gsnr_table(model, opt)
    assert table["weight"]["gsnr"] == float(opt.state[model.weight]["gsnr"])
    assert table["module.weight"]["gsnr"] == float(opt.state[model.module.weight]["gsnr"])


def test_deepcopy_and_pickle_of_model_and_optimizer_continue_identically():
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = SGDSaI(model.parameters(), lr=0.1, normalize=False, degenerate="official")
    data = [torch.randn(5, 3) for _ in range(4)]

    def train(m: nn.Module, o: SGDSaI, batches: list[torch.Tensor]) -> None:
        for x in batches:
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()

    train(model, opt, data[:2])
    copied_model, copied_opt = copy.deepcopy((model, opt))
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    loaded_model, loaded_opt = torch.load(buf, weights_only=False)
    train(model, opt, data[2:])
    for m, o in ((copied_model, copied_opt), (loaded_model, loaded_opt)):
        assert o.normalize is False and o.degenerate == "official"
        train(m, o, data[2:])
        for p, q in zip(m.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.gpu
def test_model_spanning_cpu_and_cuda_matches_the_cpu_run():
    # Naive model parallelism / layers kept on the CPU: one optimizer, tensors on two devices.
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    mixed = copy.deepcopy(cpu)
    mixed[1].cuda()
    opts = [SGDSaI(m.parameters(), lr=0.1) for m in (cpu, mixed)]
    for _ in range(3):
        x = torch.randn(5, 3, dtype=torch.float64)
        for m, o in zip((cpu, mixed), opts, strict=True):
            o.zero_grad()
            m[1](m[0](x).to(m[1].weight.device)).square().sum().backward()
            o.step()
    for p, q in zip(cpu.parameters(), mixed.parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-12, atol=1e-12)


def test_first_step_without_any_gradient_says_so():
    # The optimizer holds tensors the model no longer uses (built before a wrapper replaced
    # the parameters): the skip warning must not only say "zero".
    stale = nn.Linear(3, 2)
    opt = SGDSaI(stale.parameters())
    with pytest.warns(
        UserWarning, match="every gradient is zero at the first step .no parameter has a gradient"
    ):
        opt.step()
    assert not opt.initialized
    stale.weight.grad = torch.zeros(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert len(caught) == 1 and "no parameter has a gradient" not in str(caught[0].message)
