r"""DeepSpeed's builders of the flat-segment layout (:mod:`sai_dist.layouts.flat_segment`).

DeepSpeed's ZeRO wrappers (and its fp16/bf16 wrappers) hand the client optimizer one flat
fp32 tensor per param group or sub-group, and each rank holds only a slice of it. The
functions here read each wrapper's own bookkeeping and return the slice's segments.

The generic layout lives in :mod:`sai_dist.layouts.flat_segment`; this module
holds the builders for DeepSpeed, and knows no DeepSpeed class. The ``from_*`` builders read the wrappers'
bookkeeping by attribute (duck typing), so ``import sai_dist`` never imports DeepSpeed:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): ``round_robin_bit16_groups`` and
  ``round_robin_bit16_offsets`` give each parameter's offset in the flat group *as laid
  out* (``round_robin_gradients`` reorders it, which is why ``param._hp_mapping``, built
  from the unordered list, cannot be trusted), ``partition_size`` the slice each rank
  owns: rank ``r`` holds ``[r * P, (r + 1) * P)``.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): the flat sub-group partition is the
  concatenation of every parameter's own partition of ``partition_numel()`` elements;
  rank ``r`` holds elements ``[r * n_p, (r + 1) * n_p)`` of each parameter, padded
  after ``ds_numel`` on the last ranks.
* ``BF16_Optimizer`` (ZeRO-1 + bf16 + fp32 gradient accumulation): contiguous flat group,
  ``numel // world`` elements per rank.
* ``FP16_UnfusedOptimizer`` (stage 0 + fp16/bf16): one fp32 master copy per parameter on
  every rank, gradients already all-reduced, so statistics are local (``group=None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor

from sai_dist.layouts.base import LayoutError
from sai_dist.layouts.flat_segment import FlatSegmentLayout, Segment, segments_in_range

__all__ = [
    "FlatSegmentLayout",
    "Segment",
    "from_bf16_optimizer",
    "from_fp16_unfused",
    "from_zero3",
    "from_zero12",
    "segments_in_range",
]


# -- builders for DeepSpeed's wrappers --------------------------------------------------


def _names_for(params: Sequence[Tensor], names: dict[int, str]) -> list[str]:
    return [names.get(id(p), f"param {i} (shape {tuple(p.shape)})") for i, p in enumerate(params)]


def _single_group(groups: Sequence[Any], what: str) -> Any:
    first = groups[0]
    for g in groups[1:]:
        if g is not first:
            raise LayoutError(
                f"{what}: param groups use different data-parallel process groups (MoE expert groups); "
                "SGDSaI's DeepSpeed layout supports one data-parallel group"
            )
    return first


def _contiguous_segments(
    params: Sequence[Tensor], offsets: Sequence[int], blocks: Sequence[int], lo: int, hi: int
) -> list[Segment]:
    """Segments of parameters at ``offsets`` of a flat group that fall in ``[lo, hi)``."""
    return segments_in_range([p.numel() for p in params], offsets, blocks, lo, hi)


def from_zero12(zero: Any, names: dict[int, str]) -> FlatSegmentLayout:
    """Layout of ``DeepSpeedZeroOptimizer`` (ZeRO stage 1 and 2)."""
    group = _single_group(zero.real_dp_process_group, "ZeRO-1/2")
    params = [p for g in zero.bit16_groups for p in g]
    layout = FlatSegmentLayout(group, params, _names_for(params, names), [p.numel() for p in params])
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        rank = dist.get_rank(group=zero.real_dp_process_group[i])
        size = int(zero.partition_size[i])
        members = zero.round_robin_bit16_groups[i]
        offsets = [int(o) for o in zero.round_robin_bit16_offsets[i]]
        blocks = [layout.block_of(p) for p in members]
        if any(b is None for b in blocks) or flat.numel() != size:
            raise LayoutError("ZeRO-1/2 bookkeeping does not match its flat partitions")
        layout.add_flat(flat, _contiguous_segments(members, offsets, blocks, rank * size, (rank + 1) * size))
    return layout


def from_bf16_optimizer(bf16: Any, names: dict[int, str]) -> FlatSegmentLayout:
    """Layout of ``BF16_Optimizer`` (ZeRO-1 with bf16 weights and fp32 gradient
    accumulation): a contiguous flat group split evenly over the data-parallel ranks."""
    group = _single_group(bf16.real_dp_process_group, "BF16_Optimizer")
    params = [p for g in bf16.bf16_groups for p in g]
    layout = FlatSegmentLayout(group, params, _names_for(params, names), [p.numel() for p in params])
    for i, flat in enumerate(bf16.fp32_groups_flat_partition):
        world = dist.get_world_size(group=bf16.real_dp_process_group[i])
        rank = dist.get_rank(group=bf16.real_dp_process_group[i])
        size = bf16.bf16_groups_flat[i].numel() // world
        members = bf16.bf16_groups[i]
        offsets = [0]
        for p in members[:-1]:
            offsets.append(offsets[-1] + p.numel())
        blocks = [layout.block_of(p) for p in members]
        layout.add_flat(flat, _contiguous_segments(members, offsets, blocks, rank * size, (rank + 1) * size))
    return layout


def from_fp16_unfused(fp16: Any, names: dict[int, str]) -> FlatSegmentLayout:
    """Layout of ``FP16_UnfusedOptimizer`` (stage 0 with fp16 or bf16 weights, the wrapper
    DeepSpeed picks for any optimizer but its FusedAdam): one fp32 master copy per
    parameter, whole on every rank, gradients already all-reduced, so statistics need no
    collective."""
    params = [p for g in fp16.fp16_groups for p in g]
    layout = FlatSegmentLayout(None, params, _names_for(params, names), [p.numel() for p in params])
    for lp_group, hp_group in zip(fp16.fp16_groups, fp16.fp32_groups, strict=True):
        for lp, hp in zip(lp_group, hp_group, strict=True):
            layout.add_flat(hp, [Segment(layout.block_of(lp), 0, hp.numel(), 0)])
    return layout


def from_zero3(zero: Any, names: dict[int, str]) -> FlatSegmentLayout:
    """Layout of ``DeepSpeedZeroOptimizer_Stage3``: each sub-group's flat partition is the
    concatenation of its parameters' own partitions."""
    group = zero.dp_process_group
    rank = dist.get_rank(group=group)
    params = [p for g in zero.fp16_groups for p in g]
    layout = FlatSegmentLayout(group, params, _names_for(params, names), [int(p.ds_numel) for p in params])
    for sg, flat in enumerate(zero.fp32_partitioned_groups_flat):
        segs = []
        pos = 0
        for p in zero.fp16_groups[sg]:
            part = int(p.partition_numel())
            held = max(0, min(part, int(p.ds_numel) - rank * part))
            if held > 0:
                segs.append(Segment(layout.block_of(p), pos, pos + held, rank * part))
            pos += part
        if pos != flat.numel():
            raise LayoutError(
                f"ZeRO-3 sub-group {sg}: parameter partitions add up to {pos} elements but the flat "
                f"partition has {flat.numel()}"
            )
        layout.add_flat(flat, segs)
    return layout
