"""Every warning sai_dist emits has its own category (sai_dist.warning_categories), all under
SGDSaIWarning, a UserWarning: callers filter by category, never by message text."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sai_dist
from sai_dist import SGDSaI
from sai_dist.warning_categories import (
    DegenerateGradientWarning,
    SGDSaIWarning,
    StateWithoutGsnrWarning,
    ZeroGradientStepWarning,
)


def _caught(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return caught


def _zero_first_step() -> None:
    p = nn.Parameter(torch.ones(8))
    p.grad = torch.zeros(8)
    SGDSaI([p], lr=0.1).step()


def _one_element_gradient() -> None:
    p = nn.Parameter(torch.ones(1))
    q = nn.Parameter(torch.ones(8))
    p.grad, q.grad = torch.ones(1), torch.randn(8)
    SGDSaI([p, q], lr=0.1).step()


def _momentum_without_gsnr() -> None:
    p = nn.Parameter(torch.ones(8))
    opt = SGDSaI([p], lr=0.1)
    sd = opt.state_dict()
    sd["state"] = {0: {"momentum_buffer": torch.zeros(8)}}
    opt.load_state_dict(sd)


@pytest.mark.parametrize(
    "fn, category, text",
    [
        (_zero_first_step, ZeroGradientStepWarning, "every gradient is zero at the first step"),
        (_one_element_gradient, DegenerateGradientWarning, "zero spread"),
        (_momentum_without_gsnr, StateWithoutGsnrWarning, "holds optimizer state but no g-SNR"),
    ],
    ids=["zero-step", "degenerate", "no-gsnr"],
)
def test_each_warning_has_its_category_and_filters_by_it(fn, category, text):
    caught = _caught(fn)
    ours = [w for w in caught if issubclass(w.category, SGDSaIWarning)]
    assert [w.category for w in ours] == [category], [(w.category, str(w.message)) for w in caught]
    assert text in str(ours[0].message)
    assert issubclass(category, UserWarning) and sai_dist.SGDSaIWarning is SGDSaIWarning
    # Filtering the category (or the base) silences exactly it.
    for silenced in (category, SGDSaIWarning):
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", silenced)
            fn()
        assert not [w for w in again if issubclass(w.category, SGDSaIWarning)]
