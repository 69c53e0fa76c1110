"""``gsnr_table``: the g-SNR and scale of every parameter of the original model."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from sai_dist.names import unwrapped_name
from sai_dist.optimizer import GSNR, SCALE, SGDSaI
from sai_dist.probe import is_placeholder


def find_sgdsai(obj: Any) -> SGDSaI:
    """The :class:`SGDSaI` inside whatever a user holds: the optimizer itself, or a wrapper
    or engine that keeps it under ``.optimizer`` (DeepSpeed engines and ZeRO wrappers) or
    ``.optim`` (fairscale's OSS)."""
    seen = obj
    for _ in range(6):
        if isinstance(obj, SGDSaI):
            return obj
        inner = (
            getattr(obj, "sai_optimizer", None)
            or getattr(obj, "optimizer", None)
            or getattr(obj, "optim", None)
        )
        if inner is None or inner is obj:
            break
        obj = inner
    raise TypeError(f"no SGDSaI optimizer found in {type(seen).__name__}")


def gsnr_table(
    model: nn.Module | list[nn.Module], optimizer: Optimizer | Any, *, whole_model: bool = False
) -> dict[str, dict[str, float | int]]:
    """``{name: {"gsnr": float, "scale": float, "numel": int}}`` for every parameter whose
    g-SNR is fixed, named as in the unwrapped model and in the model's order.

    ``optimizer`` may be the :class:`SGDSaI`, or an engine or wrapper holding it. The table
    is identical on every rank: g-SNR values are reduced before they are stored. Parameters
    that have not yet had a gradient are absent.

    Model parts (pipeline stages): ``model`` may be a list of this rank's parts, with one
    optimizer for all or a list with one per part. ``whole_model=True`` gathers every
    rank's table over the optimizer's model group (``pipeline_group`` or the root mesh of
    DTensor stages) so every rank reports the whole model, in rank order; collective
    over that group.
    """
    if isinstance(model, list | tuple):
        opts = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer] * len(model)
        table = {}
        for part, opt_ in zip(model, opts, strict=True):
            table.update(gsnr_table(part, opt_))
        return _gather(table, find_sgdsai(opts[0])) if whole_model else table
    if whole_model:
        return _gather(gsnr_table(model, optimizer), find_sgdsai(optimizer))
    opt = find_sgdsai(optimizer)
    custom = getattr(opt.layout, "gsnr_table", None)
    if custom is not None:
        return custom(opt, model)
    by_id: dict[int, tuple[float, float]] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            if GSNR in state and state[GSNR].numel() == 1 and not is_placeholder(state):
                by_id[id(p)] = (float(state[GSNR]), float(state[SCALE]))
    table: dict[str, dict[str, float | int]] = {}
    for name, p in model.named_parameters():
        if id(p) in by_id:
            gsnr, scale = by_id[id(p)]
            table[unwrapped_name(model, name)] = {"gsnr": gsnr, "scale": scale, "numel": p.numel()}
    return table


def _gather(table: dict[str, dict[str, float | int]], opt: SGDSaI) -> dict[str, dict[str, float | int]]:
    group = opt.model_group()
    if group is None:
        return table
    tables: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(tables, table, group=group)
    whole: dict[str, dict[str, float | int]] = {}
    for part in tables:
        for name, row in part.items():
            whole.setdefault(name, row)
    return whole


def format_table(table: dict[str, dict[str, float | int]]) -> str:
    """``gsnr_table``'s result as aligned text, one parameter a line."""
    width = max((len(n) for n in table), default=4)
    lines = [f"{'parameter':<{width}}  {'numel':>12}  {'g-SNR':>12}  {'scale':>10}"]
    for name, row in table.items():
        lines.append(f"{name:<{width}}  {row['numel']:>12,}  {row['gsnr']:>12.4g}  {row['scale']:>10.4f}")
    return "\n".join(lines)
