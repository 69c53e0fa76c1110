"""FSDP1's flat parameters are refused with a message naming FSDP1 and the fix, without a
process group (FSDP1 marks every tensor it flattens with ``_fsdp_flattened``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

import sai_dist
from sai_dist.layouts import LayoutError


def test_fsdp1_flat_parameter_refused():
    flat = nn.Parameter(torch.zeros(20))
    _set_fsdp_flattened(flat)
    ok = nn.Parameter(torch.zeros(3))
    with pytest.raises(LayoutError, match=r"flattened by FSDP1.*shape \(20,\).*fully_shard"):
        sai_dist.SGDSaI([ok, flat])


def test_fsdp1_flat_parameter_refused_in_added_group():
    opt = sai_dist.SGDSaI([nn.Parameter(torch.zeros(3))])
    flat = nn.Parameter(torch.zeros(8))
    _set_fsdp_flattened(flat)
    with pytest.raises(LayoutError, match="FSDP1"):
        opt.add_param_group({"params": [flat]})
    assert len(opt.param_groups) == 1  # the refused group was not kept
