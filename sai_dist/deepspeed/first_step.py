"""ZeRO's first-step barrier: step 1 sees every block, so its normaliser is the whole model's.

ZeRO-1/2/3 call the client's ``step()`` once per param group / sub-group. Until g-SNR is
fixed those calls are held back and the last one steps every group at once; held-back
groups are then copied back to the low-precision weights exactly as DeepSpeed does after a
step. From step 2 on, calls pass straight through and issue no collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sai_dist.optimizer import SGDSaI

__all__ = ["install_first_step_barrier"]


def install_first_step_barrier(zero: Any, sai: SGDSaI, kind: str) -> None:
    """Hold back ZeRO's per-group ``step()`` calls until all groups have their gradients,
    then step them together, once, while g-SNR is not fixed.

    ZeRO-1/2 call ``_optimizer_step(i)`` for each param group ``i`` in turn, ZeRO-3 for
    each sub-group, each after preparing that group's unscaled, clipped fp32 gradient.
    A held-back group keeps a reference to its gradient (DeepSpeed drops its own); at the
    last call every group's gradient is re-attached and a single ``sai.step()`` over all
    groups fixes g-SNR from every block and updates every group. The fp32 partitions of
    held-back groups are then copied to the low-precision partitions, as DeepSpeed did
    (too early) right after their call.
    """
    flats: list[Tensor] = (
        zero.single_partition_of_fp32_groups if kind == "zero12" else zero.fp32_partitioned_groups_flat
    )
    original = zero._optimizer_step
    held: dict[int, Tensor | None] = {}

    def optimizer_step(i: int) -> None:
        if sai.initialized:
            held.clear()
            return original(i)
        held[i] = flats[i].grad
        if i != len(flats) - 1:
            return None
        try:
            _step_all(zero, sai, kind, flats, held)
        finally:
            held.clear()
        return None

    zero._optimizer_step = optimizer_step


@torch.no_grad()
def _step_all(zero: Any, sai: SGDSaI, kind: str, flats: list[Tensor], held: dict[int, Tensor | None]) -> None:
    before = {i: flats[i].grad for i in held}
    for i, grad in held.items():
        flats[i].grad = grad
    groups = sai.param_groups
    try:
        if kind == "zero12":
            sai.param_groups = [groups[i] for i in sorted(held)]
            sai.step()
        else:
            saved = [g["params"] for g in groups]
            for g in groups:
                g["params"] = []
            for i in sorted(held):
                groups[zero.sub_group_to_group_id[i]]["params"].append(flats[i])
            try:
                sai.step()
            finally:
                for g, params in zip(groups, saved, strict=True):
                    g["params"] = params
    finally:
        sai.param_groups = groups
        for i, grad in before.items():
            flats[i].grad = grad
    last = len(flats) - 1
    for i in sorted(held):
        if i == last:
            continue  # DeepSpeed copies the last group itself, after this call returns
        if kind == "zero12":
            rank = dist.get_rank(group=zero.real_dp_process_group[i])
            zero.parallel_partitioned_bit16_groups[i][rank].data.copy_(flats[i].data)
        else:
            zero._reassign_or_swap_out_partitioned_parameters(i)
    if kind == "zero12":
        zero._lazy_init_hp_params_optimizer_state()
