"""Rank function for the accelerate-free reproduction of optimizer-before-FSDP2 rebinding
(tests/clients/test_accelerate.py): build SGDSaI from the plain parameters, ``fully_shard``
the model, put the new DTensor parameters into the param groups (what accelerate's
``fsdp2_switch_optimizer_parameters`` does), train."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import fully_shard

import sai_dist
from sai_dist.layouts import LayoutError
from tests.clients.common import HYPER, STEPS, compare, local_batch, loss_of, make_model, params_of


def rebind_after_fully_shard(rank: int, world: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    model = make_model()
    opt = sai_dist.SGDSaI(model.named_parameters(), **HYPER)
    name_of = {id(p): n for n, p in model.named_parameters()}
    old = [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    new = dict(model.named_parameters())
    for group, names in zip(opt.param_groups, old, strict=True):
        group["params"] = [new[n] for n in names]
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, local_batch(step, rank, world)).backward()
        opt.step()
    result["layout"] = type(opt.layout).__name__
    compare(result, params_of(model), sai_dist.gsnr_table(model, opt))
    # Rebinding once g-SNR is fixed is still refused: the state belongs to the old tensors.
    opt.param_groups[0]["params"][0] = torch.nn.Parameter(torch.zeros(3))
    opt.param_groups[0]["params"][0].grad = torch.zeros(3)
    try:
        opt.step()
        result["late_rebind"] = "no error"
    except LayoutError as e:
        result["late_rebind"] = str(e)
    return result
