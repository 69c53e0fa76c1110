"""Rank functions for tests/distributed/test_fairscale_fsdp.py.

fairscale 0.4.13's FullyShardedDataParallel needs CUDA (streams, a CUDA compute device),
so on CPU the layout is tested on *synthetic* units: fairscale's own FlatParameter and
FlattenParamsWrapper (which run on CPU) carry the real flat-parameter metadata, and each
rank's shard is cut by fairscale's own ``FullyShardedDataParallel._get_shard``. A replica
of the model computes gradients, which are averaged over the ranks and sharded exactly as
fairscale's reduce-scatter leaves them; after each step the shards are all-gathered back
into the replica. SGDSaI steps the shards through ``flat_param_layout(unit)``, so this
checks the metadata reading, the shard arithmetic and padding end to end against the
single-process run. ``real_fsdp_run`` is the real wrapper, for CUDA machines.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import sai_dist
from tests.distributed import fsdp1_ranks, fsdp2_ranks


class SyntheticUnit(nn.Module):
    """The attributes of a fairscale FSDP unit that the layout reads, no more."""

    def __init__(self, module: nn.Module, rank: int, world: int, flatten: bool) -> None:
        from fairscale.nn.data_parallel.fully_sharded_data_parallel import FullyShardedDataParallel
        from fairscale.nn.misc import FlattenParamsWrapper

        super().__init__()
        self.rank, self.world_size, self.process_group = rank, world, dist.group.WORLD
        names = [n for n, _ in module.named_parameters()]
        if flatten:
            self._fsdp_wrapped_module = FlattenParamsWrapper(module, param_list=[list(module.parameters())])
            self.params = list(self._fsdp_wrapped_module.flat_params)
            self._num_flatten_params = 1
            self._param_name_groups = [names]
        else:
            self._fsdp_wrapped_module = module
            self.params = list(module.parameters())
            self._num_flatten_params = 0
            self._param_name_groups = [[n] for n in names]
        cutter = SimpleNamespace(rank=rank, world_size=world)
        self.numel_padded_per_param = []
        with torch.no_grad():
            for p in self.params:
                p._is_sharded = True
                p._orig_size = p.data.size()
                p.data, padded = FullyShardedDataParallel._get_shard(cutter, p.data)
                self.numel_padded_per_param.append(padded)

    def shard(self, full: Tensor) -> Tensor:
        from fairscale.nn.data_parallel.fully_sharded_data_parallel import FullyShardedDataParallel

        cutter = SimpleNamespace(rank=self.rank, world_size=self.world_size)
        return FullyShardedDataParallel._get_shard(cutter, full)[0]


def _flat_sources(unit: SyntheticUnit, replica: nn.Module) -> list[list[nn.Parameter]]:
    """For each stepped tensor, the replica parameters it flattens, in order."""
    params = list(replica.parameters())
    return [params] if unit._num_flatten_params else [[p] for p in params]


def synthetic_step(unit: SyntheticUnit, sources: list[list[nn.Parameter]], opt: Any, world: int) -> None:
    """One step of ``unit``'s shards from the replica gradients in ``sources``: averaged and
    sharded as fairscale's reduce-scatter leaves them, stepped, then gathered back into the
    replica."""
    for p, src in zip(unit.params, sources, strict=True):
        full = torch.cat([q.grad.reshape(-1) for q in src])
        dist.all_reduce(full)
        p.grad = unit.shard(full / world)  # what fairscale's reduce-scatter leaves
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        for p, src in zip(unit.params, sources, strict=True):
            gathered = [torch.empty_like(p.data) for _ in range(world)]
            dist.all_gather(gathered, p.data)
            full = torch.cat(gathered)
            torch.nn.utils.vector_to_parameters(full[: sum(q.numel() for q in src)], src)


def synthetic_run(rank: int, world: int, flatten: bool) -> dict[str, Any]:
    from sai_dist.layouts import flat_param_layout

    unit = SyntheticUnit(fsdp2_ranks.make_model(), rank, world, flatten)
    replica = fsdp2_ranks.make_model()  # computes gradients; receives the gathered shards
    layout = flat_param_layout(unit)
    opt = fsdp1_ranks.make_single_group_optimizer(unit, layout)
    sources = _flat_sources(unit, replica)
    for step in range(fsdp2_ranks.STEPS):
        replica.zero_grad()
        fsdp2_ranks.loss_fn(replica, *fsdp2_ranks.rank_slice(step, rank, world)).backward()
        synthetic_step(unit, sources, opt, world)
    held = sum(s.stop - s.start for f in layout.flats for s in layout.segments(f))
    return {
        "layout": type(layout).__name__,
        "padding": sum(unit.numel_padded_per_param),
        "local_elements": sum(p.numel() for p in unit.params),
        "held_elements": held,
        "table": sai_dist.gsnr_table(unit, opt),
        "params": fsdp2_ranks.full_params(replica),
    }


def launch(rank: int, world: int) -> dict[str, Any]:
    return fsdp2_ranks._plain(
        {"flat": synthetic_run(rank, world, True), "each": synthetic_run(rank, world, False)}
    )


def real_fsdp_run(rank: int, world: int, flatten: bool) -> dict[str, Any]:
    """The real fairscale FSDP on CUDA (one GPU per rank, NCCL)."""
    from fairscale.nn import FullyShardedDataParallel as FSDP

    from sai_dist.layouts import flat_param_layout

    torch.cuda.set_device(rank)
    group = dist.new_group(backend="nccl")
    model = fsdp2_ranks.make_model().cuda()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = FSDP(block, process_group=group, flatten_parameters=flatten)
    model = FSDP(model, process_group=group, flatten_parameters=flatten)
    opt = fsdp1_ranks.make_single_group_optimizer(model, flat_param_layout(model))
    for step in range(fsdp2_ranks.STEPS):
        tokens, labels = fsdp2_ranks.rank_slice(step, rank, world)
        fsdp2_ranks.loss_fn(model, tokens.cuda(), labels.cuda()).backward()
        opt.step()
        opt.zero_grad()
    table = sai_dist.gsnr_table(model, opt)
    with model.summon_full_params():
        params = {k: v.cpu() for k, v in fsdp2_ranks.full_params(model).items()}
    return {"table": table, "params": params}


def launch_real(rank: int, world: int) -> dict[str, Any]:
    return fsdp2_ranks._plain(
        {"flat": real_fsdp_run(rank, world, True), "each": real_fsdp_run(rank, world, False)}
    )
