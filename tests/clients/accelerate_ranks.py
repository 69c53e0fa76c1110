"""Rank script for tests/clients/test_accelerate.py (``torchrun ... OUT MODE``).

MODE ``ddp``: ``Accelerator(cpu=True)``, the optimizer built before ``prepare(model,
optimizer)`` as accelerate's docs order it; 2 ranks of DDP on gloo.

MODE ``fsdp2``: accelerate's own FSDP2 prepare path (``Accelerator._prepare_fsdp2``: wrap the
optimizer, swap its param groups for placeholders, ``fully_shard`` per decoder layer, then
``fsdp2_switch_optimizer_parameters`` to the new DTensor parameters). accelerate only
turns its FSDP plugin on for GPU-like devices, so on CPU the plugin is set on the state
by hand and the same method is called; everything after is what a GPU run does.
"""

from __future__ import annotations

import sys
import warnings

import torch

import sai_dist
from tests.clients.common import HYPER, STEPS, compare, local_batch, loss_of, make_model, params_of, write


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    from accelerate import Accelerator

    result: dict[str, object] = {}
    if mode == "ddp":
        accelerator = Accelerator(cpu=True)
    else:
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=True,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        )
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
        if not accelerator.is_fsdp2:  # CPU: accelerate dropped the plugin; run its FSDP2 path anyway
            accelerator.state.fsdp_plugin = plugin
            accelerator.state.distributed_type = DistributedType.FSDP
    rank, world = accelerator.process_index, accelerator.num_processes
    model = make_model()
    optimizer = sai_dist.SGDSaI(model.parameters(), **HYPER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer = accelerator.prepare(model, optimizer)
        result["is_fsdp2"] = bool(accelerator.is_fsdp2)
        sai = optimizer.optimizer
        result["group_types"] = sorted({type(p).__name__ for g in sai.param_groups for p in g["params"]})
        for step in range(STEPS):
            optimizer.zero_grad()
            accelerator.backward(loss_of(model, local_batch(step, rank, world).to(accelerator.device)))
            optimizer.step()
    result["sgdsai_warnings"] = [str(w.message) for w in caught if "SGDSaI" in str(w.message)]
    result["layout"] = type(sai.layout).__name__
    unwrapped = accelerator.unwrap_model(model)
    compare(result, params_of(unwrapped), sai_dist.gsnr_table(unwrapped, sai))
    accelerator.wait_for_everyone()
    if rank == 0:
        write(out, result)
    accelerator.end_training()


if __name__ == "__main__":
    main()
