r"""``gsnr_table``: the g-SNR and scale of every parameter of the original model.

One walk for every layout: each tensor in the optimizer's state, each of its pieces
(:meth:`~sai_dist.layouts.Layout.pieces`), the per-piece ``gsnr`` and ``scale`` stored in
its state. That gives this rank a per-block table; the layout's hooks say the rest
(declared, with their contracts, on :class:`~sai_dist.layouts.Layout`):

- :attr:`~sai_dist.layouts.Layout.table_group`: the group over which ranks holding
  different blocks combine their tables (MAX; a block is fixed on the ranks that hold it,
  absent elsewhere), or ``None`` when each rank's state already has every block it reports;
- :attr:`~sai_dist.layouts.Layout.keeps_table`: whether the combined table is kept in
  :attr:`~sai_dist.layouts.Layout.table_cache` (DeepSpeed refreshes it where every rank is
  present, so reading it later is no collective);
- :meth:`~sai_dist.layouts.Layout.table_rows`: which rows of a model are which blocks,
  named as the unwrapped model spells them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from sai_dist.collectives import all_reduce
from sai_dist.optimizer import SGDSaI
from sai_dist.probe import is_placeholder
from sai_dist.state_keys import GSNR, SCALE

__all__ = ["block_values", "find_sgdsai", "format_table", "gsnr_table"]


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
    that have not yet had a gradient are absent. Collective over the layout's
    :attr:`~sai_dist.layouts.Layout.table_group` where it has one (flat partitions under
    FSDP1/fairscale FSDP, fairscale OSS: every rank calls it together); under DeepSpeed read
    from the table the integration keeps (see :func:`block_values`).

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
    rows = opt.layout.table_rows(model)  # first: a module it cannot name raises before any collective
    gsnr, scale = block_values(opt)
    table: dict[str, dict[str, float | int]] = {}
    for name, block, numel in rows:
        if not math.isnan(float(gsnr[block])):
            table[name] = {"gsnr": float(gsnr[block]), "scale": float(scale[block]), "numel": numel}
    return table


def block_values(opt: SGDSaI, *, refresh: bool = False) -> tuple[Tensor, Tensor]:
    """``(gsnr, scale)``: per block of ``opt.layout``, float64, NaN for a block whose g-SNR
    is not fixed; identical on every rank.

    Collective over the layout's :attr:`~sai_dist.layouts.Layout.table_group` (when it is
    not ``None``) on every call, except for a layout that ``keeps_table``: that one is read
    from its cache, combined (collectively) only when the cache is empty and g-SNR is fixed
    somewhere, or when ``refresh`` asks for it (an integration, at a point where every rank
    calls it: after the step that fixes g-SNR, after a load).
    """
    layout = opt.layout
    if layout.keeps_table and not refresh and layout.table_cache is not None:
        values = layout.table_cache
    elif layout.keeps_table and not refresh and not opt.initialized:
        # Nothing fixed anywhere (the ranks agree on that): no collective needed.
        values = torch.zeros(layout.num_blocks, 3, dtype=torch.float64)
    else:
        values = _local_values(opt)
        if layout.table_group is not None:
            values = all_reduce(values, layout.table_group, dist.ReduceOp.MAX)
        if layout.keeps_table:
            layout.table_cache = values
    present = values[:, 2] > 0
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return values[:, 0].where(present, nan), values[:, 1].where(present, nan)


def _local_values(opt: SGDSaI) -> Tensor:
    """``[num_blocks, 3]`` float64 from this rank's state: g-SNR, scale (``-inf`` where
    absent, so a MAX over ranks keeps the holder's) and whether present (0 or 1). A
    probe's placeholders are not values.

    Walks the optimizer's state (every tensor it has stepped), not its param groups: a
    wrapper may empty those between its steps (DeepSpeed ZeRO-3 rebinds each group to one
    flat partition for its ``step()`` and leaves ``[]`` behind)."""
    layout = opt.layout
    values = torch.full((layout.num_blocks, 3), -math.inf, dtype=torch.float64)
    values[:, 2] = 0.0
    for p, state in opt.state.items():
        if GSNR not in state or is_placeholder(state):
            continue
        gsnr = state[GSNR].reshape(-1).tolist()
        scale = state[SCALE].reshape(-1).tolist()
        for k, piece in enumerate(layout.pieces(p)):
            row = values[piece.block]
            row[0], row[1], row[2] = max(float(row[0]), gsnr[k]), max(float(row[1]), scale[k]), 1.0
    return values


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
