"""Rank function for tests/clients/test_integration_hints.py: fairscale's OSS building
SGDSaI *without* ``import sai_dist.fairscale`` must refuse step 1 on every rank with an
error that names the import, and change nothing."""

from __future__ import annotations

import sys
from typing import Any

import torch

import sai_dist
from tests.clients.common import HYPER, loss_of, make_model


def oss_without_integration(rank: int, world: int) -> dict[str, Any]:
    from fairscale.optim import OSS

    assert "sai_dist.fairscale" not in sys.modules
    model = make_model()
    opt = OSS(model.parameters(), optim=sai_dist.SGDSaI, **HYPER)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    loss_of(model, ids).backward()
    for p in model.parameters():  # what DDP / ShardedDDP would do
        torch.distributed.all_reduce(p.grad)
    out: dict[str, Any] = {"error_type": None, "error": None}
    try:
        opt.step()
    except Exception as e:
        out["error_type"], out["error"] = type(e).__name__, str(e)
    out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    out["state"] = len(opt.optim.state)
    return out
