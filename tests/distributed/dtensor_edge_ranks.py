"""Rank functions for tests/distributed/test_dtensor_edge_cases.py (gloo, CPU)."""

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


class LateModel(nn.Module):
    """``late`` gets no gradient until step LATE_FROM: its g-SNR is fixed then, scaled by
    the step-1 max. ``head.weight`` has dim 0 = 3 (empty shards at 4 ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.late = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        out = self.head(h)
        if step >= LATE_FROM:
            out = out + self.late(h)
        return out


LATE_FROM, LATE_STEPS, LATE_SAVE = 3, 6, 2


def _late_model() -> LateModel:
    torch.manual_seed(3)
    return LateModel()


def _late_optimizer(model: nn.Module) -> sai_dist.SGDSaI:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return sai_dist.SGDSaI([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=0.1)


def _late_train(model: nn.Module, opt: sai_dist.SGDSaI, start: int, stop: int) -> None:
    for step in range(start, stop):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        (model(x, step) - y).square().mean().backward()
        opt.step()


def late_reference() -> dict[str, Any]:
    model = _late_model()
    opt = _late_optimizer(model)
    _late_train(model, opt, 0, LATE_STEPS)
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "table": sai_dist.gsnr_table(model, opt),
    }


def late_block_fsdp2(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    """FSDP2: a block's first gradient after step 1, and a DCP checkpoint saved before it
    had one, loaded into a fresh model/optimizer (same data on every rank, so the averaged
    gradient is the single-process one)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sai_dist import checkpoint

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    for run in ("straight", "resumed"):
        model = fully_shard(_late_model(), mesh=mesh)
        opt = _late_optimizer(model)
        if run == "straight":
            _late_train(model, opt, 0, LATE_SAVE)
            checkpoint.save(save_dir, model, opt)
            _late_train(model, opt, LATE_SAVE, LATE_STEPS)
        else:
            checkpoint.load(save_dir, model, opt)
            _late_train(model, opt, LATE_SAVE, LATE_STEPS)
        out[run] = {
            # Plain lists: tensors would travel back through shared memory of an exited process.
            "params": {n: p.full_tensor().tolist() for n, p in model.named_parameters()},
            "table": sai_dist.gsnr_table(model, opt),
        }
    return out


def sub_world_meshes(rank: int, world: int) -> dict[str, Any]:
    """Two 1-D meshes over halves of a 4-rank world (pipeline stages with FSDP2 each): each
    half's SGDSaI reduces over its own mesh only. Every rank holds the same model; the
    half's g-SNR must equal the single-process one on the whole tensors."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    halves = [[0, 1], [2, 3]]
    meshes = [DeviceMesh("cpu", h) for h in halves]  # every rank builds both (new_group)
    mesh = meshes[rank // 2]
    g = torch.Generator().manual_seed(11 + rank // 2)  # the two stages hold different data
    wholes = [torch.randn(5, 3, generator=g), torch.randn(1, 4, generator=g)]
    grads = [torch.randn(5, 3, generator=g), 3.0 + torch.randn(1, 4, generator=g)]
    params = [nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in wholes]
    for p, gr in zip(params, grads, strict=True):
        p.grad = distribute_tensor(gr, mesh, [Shard(0)])
    opt = sai_dist.SGDSaI(params, lr=0.1)
    opt.step()
    expected = [float(gr.norm() / (gr.std() + 1e-8)) for gr in grads]
    return {"gsnr": [float(opt.state[p]["gsnr"]) for p in params], "expected": expected}
