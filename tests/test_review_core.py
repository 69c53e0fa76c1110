"""Regression tests from a correctness review of the core (single process)."""

from __future__ import annotations

import warnings

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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(SGDSaI([p]).state_dict())
    assert [w.filename for w in caught] == [__file__]
