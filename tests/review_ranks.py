"""Rank functions for tests/test_review_dtensor.py (gloo, CPU)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import sai_dist


def grad_placement_mismatch(rank: int, world: int) -> dict[str, Any]:
    """A DTensor parameter whose gradient has other placements than the parameter: step()
    must refuse it naming it, with nothing modified."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    cases = {
        "partial": ([Replicate()], lambda g: DTensor.from_local(g / world, mesh, [Partial()])),
        "shard1": ([Shard(0)], lambda g: distribute_tensor(g, mesh, [Shard(1)])),
    }
    for key, (placements, make_grad) in cases.items():
        torch.manual_seed(0)
        w = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, placements))
        b = nn.Parameter(distribute_tensor(torch.randn(4), mesh, [Shard(0)]))
        opt = sai_dist.SGDSaI([w, b], lr=0.1)
        w.grad = make_grad(torch.randn(4, 6))
        b.grad = distribute_tensor(torch.randn(4), mesh, [Shard(0)])
        before = [w.to_local().clone(), b.to_local().clone()]
        try:
            opt.step()
            out[key] = "no error"
        except Exception as e:
            out[key] = f"{type(e).__name__}: {e}"
        after = [w.to_local(), b.to_local()]
        out[key + "_unchanged"] = all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
        out[key + "_state"] = len(opt.state)
    return out
