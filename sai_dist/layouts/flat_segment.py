r"""Flat-segment layout: blocks of the original model inside flat, partitioned buffers.

A wrapper that hands the client optimizer flat tensors (DeepSpeed's ZeRO partitions,
FSDP1's and fairscale FSDP's ``FlatParameter`` shards) gives each rank a slice that is a
run of *segments*: contiguous pieces of original parameters, laid end to end, with
alignment padding that belongs to no parameter. A :class:`Segment` records one of them:

.. math::
    \text{flat}[\text{start}:\text{stop}] \;=\;
    \operatorname{vec}(W_b)[\text{offset} : \text{offset} + (\text{stop} - \text{start})]

so the statistics engine sees exactly the elements of block ``b`` that this rank holds
(``counted=True``: every element lives on exactly one rank of the data-parallel group)
and padding never enters a g-SNR.

This module is generic: it knows no wrapper. The builders that read DeepSpeed's
bookkeeping live in :mod:`sai_dist.layouts.zero`, those for FSDP1 and fairscale FSDP in
:mod:`sai_dist.layouts.flat_param`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

from sai_dist.layouts.base import Layout, LayoutError, Origin
from sai_dist.names import unwrapped_name
from sai_dist.stats import Piece

__all__ = ["FlatSegmentLayout", "Segment", "segments_in_range"]


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, stop)`` of a local flat tensor are elements
    ``[offset, offset + stop - start)`` of the flattened block ``block``."""

    block: int
    start: int
    stop: int
    offset: int


class FlatSegmentLayout(Layout):
    """Blocks laid out as segments of flat local tensors.

    Args:
        group: process group the flat partitions are split over (statistics are summed
            over it), or ``None`` when every rank holds every element.
        params: the original parameters, one per block, in block order; ``None`` for a
            block whose parameter object no longer exists (FSDP1 with
            ``use_orig_params=False`` keeps only its metadata).
        names: their names (``model.named_parameters()``), same order.
        numels: their element counts (ZeRO-3 parameters report ``numel() == 0``).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        params: Sequence[Tensor | None],
        names: Sequence[str],
        numels: Sequence[int],
    ) -> None:
        super().__init__()
        if not (len(params) == len(names) == len(numels)):
            raise ValueError("params, names and numels must have the same length")
        self.group = group
        self._params = list(params)
        self._numels = [int(n) for n in numels]
        self._block_of_param = {id(p): b for b, p in enumerate(self._params) if p is not None}
        self._names = dict(enumerate(names))
        self._segments: dict[int, tuple[Segment, ...]] = {}
        self._flats: list[Tensor] = []

    # -- building ------------------------------------------------------------------

    def add_flat(self, flat: Tensor, segments: Iterable[Segment]) -> None:
        """Declare a flat local tensor and the segments of blocks it holds."""
        segs = tuple(segments)
        n = flat.numel()
        for s in segs:
            if not (0 <= s.start < s.stop <= n):
                raise LayoutError(f"segment {s} outside a flat tensor of {n} elements")
            if not (0 <= s.block < len(self._params)):
                raise LayoutError(f"segment {s} names an unknown block")
            if s.offset + (s.stop - s.start) > self._numels[s.block]:
                raise LayoutError(f"segment {s} runs past the end of {self.block_name(s.block)}")
        self._segments[id(flat)] = segs
        self._flats.append(flat)

    @property
    def flats(self) -> list[Tensor]:
        """Every flat local tensor this layout maps, in declaration order."""
        return list(self._flats)

    def segments(self, flat: Tensor) -> tuple[Segment, ...]:
        """The segments of ``flat``; raises :class:`LayoutError` for an unknown tensor."""
        segs = self._segments.get(id(flat))
        if segs is None:
            raise LayoutError(
                f"SGDSaI is stepping a tensor of shape {tuple(flat.shape)} that its flat-segment layout does "
                "not know: the wrapper's partitions changed after the layout was attached."
            )
        return segs

    def block_of(self, param: Tensor) -> int | None:
        """The block index of an original parameter, or ``None``."""
        return self._block_of_param.get(id(param))

    @property
    def block_params(self) -> list[Tensor | None]:
        return list(self._params)

    @property
    def block_numels(self) -> list[int]:
        return list(self._numels)

    # -- Layout contract -----------------------------------------------------------

    def register(self, params: Sequence[Tensor]) -> None:
        for p in params:
            self.segments(p)

    def name_blocks(self, params: Sequence[Tensor], names: Sequence[str]) -> None:
        # Blocks are named from the model when the layout is built; the stepped tensors
        # are flat partitions, which have no single name.
        return

    @property
    def num_blocks(self) -> int:
        return len(self._params)

    def signature(self) -> list[object]:
        # Each rank holds other segments, but every rank knows every block's size.
        return list(self._numels)

    def pieces(self, param: Tensor) -> Sequence[Piece]:
        return tuple(Piece(s.block, (s.start, s.stop)) for s in self.segments(param))

    def element_origin(self, param: Tensor) -> list[Origin] | None:
        # A segment is vec(W_b)[offset : offset + n]: its own block's size and offset, so a
        # shard draws (and quantizes, and applies the small-tensor rule) per element as the
        # single-process run does.
        return [Origin(self._numels[s.block], s.offset) for s in self.segments(param)]

    def describe(self, param: Tensor) -> str:
        segs = self._segments.get(id(param), ())
        names = sorted({self.block_name(s.block) for s in segs})
        held = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f"flat partition of {param.numel()} elements holding {held or 'padding only'}"

    # -- g-SNR table (sai_dist.table) ------------------------------------------------

    @property
    def table_group(self) -> dist.ProcessGroup | None:
        # A rank's state holds the g-SNR of the segments it steps only.
        return self.group

    # DeepSpeed refreshes the kept table after the g-SNR step and after loads (every rank
    # is there), so reading it later (rank 0 alone printing it, say) needs no collective.
    keeps_table = True

    def table_rows(self, model: nn.Module) -> list[tuple[str, int, int]]:
        # The model's parameters are not the stepped tensors (those are flat partitions):
        # blocks by parameter identity, sizes from the layout (ZeRO-3 parameters report 0).
        rows = []
        for name, p in model.named_parameters():
            b = self.block_of(p)
            if b is not None:
                rows.append((unwrapped_name(model, name), b, self._numels[b]))
        return rows


def segments_in_range(
    numels: Sequence[int], offsets: Sequence[int], blocks: Sequence[int], lo: int, hi: int
) -> list[Segment]:
    """Segments of blocks laid out at ``offsets`` (``numels`` elements each) of a flat
    tensor that fall in the rank's range ``[lo, hi)``, indexed relative to ``lo``. Whatever
    of ``[lo, hi)`` no block covers (alignment or end padding) is in no segment."""
    segs = []
    for n, off, b in zip(numels, offsets, blocks, strict=True):
        start, stop = max(off, lo), min(off + n, hi)
        if start < stop:
            segs.append(Segment(b, start - lo, stop - lo, start - off))
    segs.sort(key=lambda s: s.start)
    return segs
