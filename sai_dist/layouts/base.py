"""The seam between the optimizer and a sharding wrapper.

A layout answers three questions for :class:`sai_dist.SGDSaI`, which knows no wrapper:

1. which block of the original model does each stepped tensor hold, and which part of it
   (:meth:`Layout.pieces`);
2. over which process group do per-block statistics sum (:attr:`Layout.group`);
3. on which plain tensor does the arithmetic of a step run (:meth:`Layout.local`).

One small module per wrapper implements it (``replicated`` for single process and DDP,
``dtensor`` for FSDP2/HSDP, flat-segment layouts for ZeRO). Everything that follows,
statistics, g-SNR and the per-piece scale applied every step, is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch.distributed as dist
from torch import Tensor

from sai_dist.stats import Piece, Source


class LayoutError(RuntimeError):
    """A tensor reached the optimizer that its layout cannot map onto model blocks."""


# Attribute FSDP1 (FullyShardedDataParallel) sets on every tensor it flattens, flat
# parameters and the views it hands out with use_orig_params=True alike.
_FSDP1_FLATTENED = "_fsdp_flattened"


def refuse_fsdp1(param: Tensor) -> None:
    """Raise :class:`LayoutError` for a tensor FSDP1 flattened: its g-SNR would be that of
    a flat shard mixing several original parameters."""
    if getattr(param, _FSDP1_FLATTENED, False):
        raise LayoutError(
            "SGDSaI was given a parameter flattened by FSDP1 (FullyShardedDataParallel), shape "
            f"{tuple(param.shape)}: its g-SNR would be computed on a flat shard that mixes several "
            "original parameters, not on the parameters themselves. Shard with FSDP2 "
            "(torch.distributed.fsdp.fully_shard) instead; FSDP1 is not supported yet."
        )


class Layout(ABC):
    """Maps the tensors an optimizer steps onto blocks of the original model.

    Contract: block indices are dense, ``0 <= block < num_blocks``, and the same on every
    rank of :attr:`group`; every rank of the group calls the statistics collectives
    together, so all ranks must agree on which blocks have gradients at a given step.
    """

    #: Process group per-block statistics are summed over; ``None`` when each rank holds
    #: every block whole (single process, DDP).
    group: dist.ProcessGroup | None = None

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    @abstractmethod
    def register(self, params: Sequence[Tensor]) -> None:
        """Learn the tensors of a new param group. Raise :class:`LayoutError` for a tensor
        this layout cannot map."""

    def name_blocks(self, params: Sequence[Tensor], names: Sequence[str]) -> None:
        """Attach human names (e.g. from ``model.named_parameters()``) to the blocks of
        registered whole-block tensors, for warnings and errors."""
        for p, name in zip(params, names, strict=True):
            for piece in self.pieces(p):
                if piece.span is None:
                    self._names[piece.block] = name

    def block_name(self, block: int) -> str:
        """The name of a block, or ``"block <i>"`` when none is known."""
        return self._names.get(block, f"block {block}")

    @property
    @abstractmethod
    def num_blocks(self) -> int:
        """Size of the global block index space."""

    def signature(self) -> list[object]:
        """Per block, what every rank of :attr:`group` (and every data-parallel replica)
        holds identically by contract: exchanged by SGDSaI's cross-rank consistency check,
        so a different model on one rank is named instead of feeding the statistics
        collectives buffers of another size. Default: one entry per block, the index."""
        return list(range(self.num_blocks))

    @abstractmethod
    def pieces(self, param: Tensor) -> Sequence[Piece]:
        """The pieces of blocks that the stepped tensor ``param`` holds on this rank.
        Spans index the flattened :meth:`local` tensor. Raise :class:`LayoutError` for a
        tensor that was never registered."""

    def local(self, tensor: Tensor) -> Tensor:
        """The plain tensor the step's arithmetic runs on (a DTensor's local shard, say)."""
        return tensor

    def check_grad(self, param: Tensor) -> None:
        """Raise :class:`LayoutError` if ``param.grad`` (not ``None``) cannot be stepped
        with ``param`` piece by piece: by default, their :meth:`local` tensors must have the
        same shape. Called for every gradient before step() computes or modifies anything."""
        grad_shape, param_shape = self.local(param.grad).shape, self.local(param).shape
        if grad_shape != param_shape:
            raise LayoutError(
                f"SGDSaI: the gradient of {self.describe(param)} has local shape {tuple(grad_shape)}, "
                f"not the parameter's {tuple(param_shape)}."
            )

    def sources(self, params: Iterable[Tensor]) -> list[Source]:
        """``(local gradient, pieces)`` for every tensor in ``params`` that has a gradient:
        the input of :func:`sai_dist.stats.reduce_block_moments`."""
        return [(self.local(p.grad), self.pieces(p)) for p in params if p.grad is not None]

    def describe(self, param: Tensor) -> str:
        """A short human description of a stepped tensor for error messages."""
        return f"tensor of shape {tuple(param.shape)}"
