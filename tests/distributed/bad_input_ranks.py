"""Rank functions for tests/distributed/test_bad_input.py (gloo, CPU): cross-rank consistency, ranks
with no parameters, late blocks, all in one 3-rank launch.

Every case runs on every rank in turn and records, per rank, the error it raised (type and
message, or ``"no error"``) and whether the parameters, gradients and optimizer state are
exactly as before. A case that hung would time the launch out instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sai_dist import SGDSaI
from sai_dist.layouts.zero import FlatSegmentLayout, Segment
from sai_dist.table import block_values

LR = 0.1


def _snapshot(params: list[torch.Tensor], opt: SGDSaI) -> list[Any]:
    """Everything a refused call must leave as it was."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor | None) -> Any:
        if t is None:
            return None
        t = t.to_local() if isinstance(t, DTensor) else t
        return (t.to_dense() if t.is_sparse else t).detach().clone()

    state = {
        i: {k: local(v) for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state
    }
    return [[local(p) for p in params], [local(p.grad) for p in params], state, len(opt.param_groups)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _attempt(call: Callable[[], Any], params: list[torch.Tensor], opt: SGDSaI) -> dict[str, Any]:
    before = _snapshot(params, opt)
    try:
        call()
        error = "no error"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "unchanged": _same(before, _snapshot(params, opt))}


def _plain(seed: int, *shapes: tuple[int, ...]) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _grads(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) + 0.5


# -- replicated (DDP-like): statistics are local, the check runs over the world ---------


def replicated_cases(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}

    # A hyperparameter edited on one node: rank 1 trains at lr 0.2.
    params = _plain(0, (4, 3), (5,))
    groups = [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}]
    opt = SGDSaI(groups, lr=0.2 if rank == 1 else LR)
    _grads(params, 1)
    out["lr"] = _attempt(opt.step, params, opt)

    # Divergent replicas: rank 2's gradient of "w" differs (a missing all-reduce).
    params = _plain(0, (4, 3), (5,))
    opt = SGDSaI([("w", params[0]), ("b", params[1])], lr=LR)
    _grads(params, 7 if rank == 2 else 1)
    params[1].grad = torch.full((5,), 0.25) + torch.arange(5.0)  # equal on every rank
    out["grads"] = _attempt(opt.step, params, opt)

    # Another param-group split on rank 0: one group instead of two.
    params = _plain(0, (4, 3), (5,))
    groups: Any = [{"params": params}] if rank == 0 else [{"params": params[:1]}, {"params": params[1:]}]
    opt = SGDSaI(groups, lr=LR)
    _grads(params, 1)
    out["groups"] = _attempt(opt.step, params, opt)

    # A local refusal on one rank only: rank 1's gradient is sparse. Its peers raise too.
    params = _plain(0, (4, 3))
    opt = SGDSaI(params, lr=LR)
    _grads(params, 1)
    if rank == 1:
        params[0].grad = params[0].grad.to_sparse()
    out["refusal"] = _attempt(opt.step, params, opt)

    # Opt-out: ranks that train different things on purpose.
    params = _plain(rank, (4, 3))
    opt = SGDSaI(params, lr=LR * (rank + 1), check_ranks=False)
    _grads(params, rank)
    out["opt_out"] = _attempt(opt.step, params, opt)

    # Consistent: one fingerprint all_reduce at step 1, none after.
    params = _plain(0, (4, 3), (5,))
    opt = SGDSaI(params, lr=LR)
    out["replicated_counts"] = _count_steps(params, opt, 3)

    # Ranks in different calls: rank 0 loads a checkpoint while its peers step. The check
    # is the same fixed-size collective in both, so they meet and are told, not hung.
    params = _plain(0, (4, 3), (5,))
    opt = SGDSaI(params, lr=LR)
    _grads(params, 1)
    sd = _trained_state(1, [(4, 3), (5,)])
    out["calls"] = _attempt((lambda: opt.load_state_dict(sd)) if rank == 0 else opt.step, params, opt)

    # Checkpoint consistency: rank 2 loads a state dict from another run (other g-SNR max).
    out["load_gsnr_max"] = _load_case(rank, other_run_rank=2)
    # A checkpoint of another model on rank 1 only: it refuses, its peers raise too.
    out["load_other_model"] = _load_case(rank, other_model_rank=1)
    return out


def _count_steps(params: list[torch.Tensor], opt: SGDSaI, steps: int) -> list[dict[str, int]]:
    from tests.support.collectives import CollectiveCounter

    counts = []
    for step in range(steps):
        _grads(params, 10 + step)
        with CollectiveCounter() as c:
            opt.step()
        counts.append(dict(c.counts))
    return counts


def _trained_state(seed: int, shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """A state dict after one step, built with the consistency check off (a different run)."""
    params = _plain(0, *shapes)
    opt = SGDSaI(params, lr=LR, check_ranks=False)
    _grads(params, seed)
    opt.step()
    return opt.state_dict()


def _load_case(rank: int, other_run_rank: int = -1, other_model_rank: int = -1) -> dict[str, Any]:
    shapes = [(4, 3), (5,)]
    if rank == other_model_rank:
        sd = _trained_state(1, [(3, 4), (5,)])
    else:
        sd = _trained_state(9 if rank == other_run_rank else 1, shapes)
    params = _plain(0, *shapes)
    opt = SGDSaI(params, lr=LR)
    return _attempt(lambda: opt.load_state_dict(sd), params, opt)


# -- DTensor (FSDP2-like): statistics reduced over the mesh ---------------------------


def dtensor_cases(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}

    def sharded(wholes: list[torch.Tensor]) -> list[nn.Parameter]:
        return [nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in wholes]

    def whole_grads(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*s, generator=g) * (i + 1) + 0.3 * i for i, s in enumerate(shapes)]

    def set_grads(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
        for p, gr in zip(params, grads, strict=True):
            p.grad = distribute_tensor(gr, mesh, [Shard(0)])

    # Ranks with no elements and a world size that divides nothing: (5, 3) splits 2/2/1,
    # (2,) leaves rank 2 an empty shard, (1, 4) leaves ranks 1 and 2 empty. g-SNR must be
    # the whole tensors' all the same, with 1 fingerprint + 2 statistics all_reduces.
    shapes = [(5, 3), (2,), (1, 4)]
    g = torch.Generator().manual_seed(5)
    params = sharded([torch.randn(*s, generator=g) for s in shapes])
    grads = whole_grads(shapes, 6)
    opt = SGDSaI(params, lr=LR)
    from tests.support.collectives import CollectiveCounter

    set_grads(params, grads)
    with CollectiveCounter() as c:
        opt.step()
    out["uneven"] = {
        "local_numels": [p.to_local().numel() for p in params],
        "gsnr": [float(opt.state[p]["gsnr"]) for p in params],
        "expected": [float(gr.norm() / (gr.std() + 1e-8)) if gr.numel() > 1 else math.nan for gr in grads],
        "counts": dict(c.counts),
    }

    # A parameter added with add_param_group after step 1 (late block): g-SNR at its first
    # gradient over the whole tensor, scaled by the step-1 max; the check runs at that step.
    for variant in ("same", "lr_on_rank_1"):
        g = torch.Generator().manual_seed(5)
        params = sharded([torch.randn(*s, generator=g) for s in shapes[:1]])
        opt = SGDSaI(params, lr=LR)
        set_grads(params, whole_grads(shapes[:1], 6))
        opt.step()
        late = sharded([torch.randn(4, 2, generator=g)])
        lr = 0.5 if variant == "lr_on_rank_1" and rank == 1 else 0.05
        opt.add_param_group({"params": late, "lr": lr})
        late_grad = torch.randn(4, 2, generator=torch.Generator().manual_seed(8)) * 3 + 1
        set_grads(params, whole_grads(shapes[:1], 7))
        set_grads(late, [late_grad])
        everything = params + late
        with CollectiveCounter() as c:
            result = _attempt(opt.step, everything, opt)
        result["counts"] = dict(c.counts)
        if result["error"] == "no error":
            result["gsnr"] = float(opt.state[late[0]]["gsnr"])
            result["scale"] = float(opt.state[late[0]]["scale"])
            result["gsnr_max"] = float(opt.state[params[0]]["gsnr_max"])
            result["expected_gsnr"] = float(late_grad.norm() / (late_grad.std() + 1e-8))
        out[f"late_{variant}"] = result

    # A different model on rank 2 (an extra parameter): the block counts differ, so the
    # statistics buffers would have different sizes. Named, not a hang.
    # (distribute_tensor is collective, so every rank builds all four and keeps its own.)
    wholes = [torch.randn(*s, generator=torch.Generator().manual_seed(5)) for s in shapes]
    every = sharded([*wholes, torch.ones(3, 3)])
    set_grads(every, [*whole_grads(shapes, 6), torch.ones(3, 3) + torch.eye(3)])
    params = every if rank == 2 else every[:3]
    opt = SGDSaI(params, lr=LR)
    out["model"] = _attempt(opt.step, params, opt)

    # momentum edited on rank 0 only.
    params = sharded(wholes)
    opt = SGDSaI(params, lr=LR, momentum=0.8 if rank == 0 else 0.9)
    set_grads(params, whole_grads(shapes, 6))
    out["momentum"] = _attempt(opt.step, params, opt)
    return out


# -- flat partitions (ZeRO-like): a rank whose partition is padding only ---------------


def flat_padding_rank(rank: int, world: int) -> dict[str, Any]:
    """Two blocks of 6 and 3 elements in a flat buffer of 9 split over 3 ranks as 5/4/0
    (+ padding): rank 2 holds padding only and must still join every collective."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(12)
    a_grad, b_grad = torch.randn(6, generator=g), torch.randn(3, generator=g) * 2 + 1
    whole = torch.cat([a_grad, b_grad])
    spans = {0: (0, 5), 1: (5, 9), 2: (9, 9)}
    lo, hi = spans[rank]
    flat = nn.Parameter(torch.zeros(5))
    flat.grad = torch.full((5,), 1e9)  # padding is garbage that must never count
    flat.grad[: hi - lo] = whole[lo:hi]
    segs = []
    for block, (start, stop) in enumerate([(0, 6), (6, 9)]):
        s, e = max(start, lo), min(stop, hi)
        if s < e:
            segs.append(Segment(block, s - lo, e - lo, s - start))
    layout = FlatSegmentLayout(dist.group.WORLD, [torch.empty(6), torch.empty(3)], ["a", "b"], [6, 3])
    layout.add_flat(flat, segs)
    opt = SGDSaI([flat], lr=LR, layout=layout)
    opt.step()
    gsnr, _ = block_values(opt, refresh=True)
    expected = [float(x.norm() / (x.std() + 1e-8)) for x in (a_grad, b_grad)]
    return {"segments": len(segs), "gsnr": gsnr.tolist(), "expected": expected}


def launch(rank: int, world: int) -> dict[str, Any]:
    return {
        "replicated": replicated_cases(rank),
        "dtensor": dtensor_cases(rank, world),
        "flat": flat_padding_rank(rank, world),
    }
