"""Rank functions for tests/distributed/test_fairscale_oss.py: fairscale OSS (with DDP or
ShardedDataParallel) against the single-process SGDSaI of tests/distributed/fsdp2_ranks.py.

Same model, data split and param groups as the FSDP2 tests: every rank trains on its
contiguous slice of the global batch with the mean loss; DDP and ShardedDataParallel
average gradients, so the result equals the single-process run on the full batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import sai_dist
from tests.distributed import fsdp2_ranks


def _build(model: nn.Module, wrapper: str) -> tuple[nn.Module, Any]:
    """``OSS(param_groups, optim=SGDSaI, ...)`` exactly as a user writes it, and the
    model wrapped with DDP or ShardedDataParallel."""
    # Importing sai_dist.fairscale hooks OSS so its inner SGDSaI gets the layout.
    from fairscale.nn import ShardedDataParallel
    from fairscale.optim import OSS
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sai_dist.fairscale

    opt = OSS(fsdp2_ranks.param_groups(model), optim=sai_dist.SGDSaI, lr=fsdp2_ranks.LR, momentum=0.9)
    wrapped = ShardedDataParallel(model, opt) if wrapper == "sdp" else DDP(model)
    return wrapped, opt


def _train(
    wrapped: nn.Module, opt: Any, rank: int, world: int, start: int, stop: int
) -> list[dict[str, int]]:
    from tests.support.collectives import CollectiveCounter

    counts = []
    for step in range(start, stop):
        fsdp2_ranks.loss_fn(wrapped, *fsdp2_ranks.rank_slice(step, rank, world)).backward()
        with CollectiveCounter() as c:
            opt.step()
        counts.append(dict(c.counts))
        # ShardedDataParallel's gradients are views into its reduce buckets: its own
        # zero_grad() zeroes them in place, while OSS.zero_grad() (set_to_none) would
        # detach them from the buckets, which then reduce stale values (fairscale's recipe).
        (wrapped if hasattr(wrapped, "_bucket_list") else opt).zero_grad()
    return counts


def oss_run(rank: int, world: int, wrapper: str) -> dict[str, Any]:
    model = fsdp2_ranks.make_model()
    wrapped, opt = _build(model, wrapper)
    counts = _train(wrapped, opt, rank, world, 0, fsdp2_ranks.STEPS)
    inner = opt.optim
    owned = sum(len(g["params"]) for g in inner.param_groups)
    return {
        "layout": type(inner.layout).__name__,
        "owned": owned,
        "owned_state": sum(1 for s in inner.state.values() if "gsnr" in s),
        "all_reduce": [c.get("dist.all_reduce", 0) for c in counts],
        "table": sai_dist.gsnr_table(model, opt),  # collective: every rank calls it
        "table_via_wrapper": sai_dist.gsnr_table(wrapped, opt),
        "params": fsdp2_ranks.full_params(model),
    }


def round_trip(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    """Train SAVE_AT steps, consolidate + state_dict, save; load into a fresh OSS and
    model, check the loaded g-SNR, train to STEPS."""
    model = fsdp2_ranks.make_model()
    wrapped, opt = _build(model, "sdp")
    _train(wrapped, opt, rank, world, 0, fsdp2_ranks.SAVE_AT)
    saved_table = sai_dist.gsnr_table(model, opt)
    opt.consolidate_state_dict(recipient_rank=0)
    path = os.path.join(save_dir, "oss.pt")
    if rank == 0:
        state = opt.state_dict()
        torch.save({"model": model.state_dict(), "optim": state}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=False)
    # Every parameter's entry carries the fixed g-SNR (consolidated from all owners).
    entries = saved["optim"]["state"]
    # OSS indexes its state by position in chain(param_groups): name those positions.
    ref_model = fsdp2_ranks.make_model()
    name_of = {id(p): n for n, p in ref_model.named_parameters()}
    names = [name_of[id(p)] for g in fsdp2_ranks.param_groups(ref_model) for p in g["params"]]
    gsnr_in_dict = {names[i]: float(entries[i]["gsnr"]) for i in sorted(entries)}

    fresh = fsdp2_ranks.make_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()  # the checkpoint, not the seed, must provide the weights
    fresh.load_state_dict(saved["model"])
    wrapped2, opt2 = _build(fresh, "sdp")
    opt2.load_state_dict(saved["optim"])
    loaded_table = sai_dist.gsnr_table(fresh, opt2)
    scalar_devices = sorted(
        {str(s[k].device) + str(s[k].dtype) for s in opt2.optim.state.values() for k in ("gsnr", "scale")}
    )
    _train(wrapped2, opt2, rank, world, fsdp2_ranks.SAVE_AT, fsdp2_ranks.STEPS)
    return {
        "saved_table": saved_table,
        "loaded_table": loaded_table,
        "final_table": sai_dist.gsnr_table(fresh, opt2),
        "initialized": opt2.optim.initialized,
        "gsnr_in_dict": gsnr_in_dict,
        "entries": len(entries),
        "num_params": len(names),
        "scalar_devices": scalar_devices,
        "params": fsdp2_ranks.full_params(fresh),
    }


def local_max_control(rank: int, world: int) -> dict[str, Any]:
    """Negative control: the same OSS with the inner SGDSaI left on a per-rank layout (what
    ``OSS(optim=SGDSaI)`` gives without sai_dist.fairscale) normalises by each rank's own
    max. Returns the scales this rank fixed after one step."""
    from sai_dist.layouts import ReplicatedLayout

    model = fsdp2_ranks.make_model()
    wrapped, opt = _build(model, "ddp")
    opt.optim.use_layout(ReplicatedLayout())
    # The per-rank layout gives ranks different blocks, which the cross-rank check would
    # (rightly) refuse; the control wants the wrong numbers it produces.
    opt.optim.check_ranks = False
    _train(wrapped, opt, rank, world, 0, 1)
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: float(s["scale"]) for p, s in opt.optim.state.items()}


def launch_2(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    return fsdp2_ranks._plain(
        {
            "control": local_max_control(rank, world),
            "ddp": oss_run(rank, world, "ddp"),
            "sdp": oss_run(rank, world, "sdp"),
            "round_trip": round_trip(rank, world, save_dir),
        }
    )


def launch_3(rank: int, world: int) -> dict[str, Any]:
    return fsdp2_ranks._plain({"ddp": oss_run(rank, world, "ddp"), "sdp": oss_run(rank, world, "sdp")})
