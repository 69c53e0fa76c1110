"""The seam between the optimizer and a sharding wrapper.

A layout answers three questions for :class:`sai_dist.SGDSaI`, which knows no wrapper:

1. which block of the original model does each stepped tensor hold, and which part of it
   (:meth:`Layout.pieces`);
2. over which process group do per-block statistics sum (:attr:`Layout.group`);
3. on which plain tensor does the arithmetic of a step run (:meth:`Layout.local`);
4. for :func:`sai_dist.gsnr_table`: which parameters of a model are its blocks, and over
   which group the ranks' stored values are combined (the table hooks at the end).

Every member is declared here with its contract; the three abstract ones are required,
the rest have defaults (docs/design.md, "layouts/", lists them all).

One small module per wrapper implements it (``replicated`` for single process and DDP,
``dtensor`` for FSDP2/HSDP, flat-segment layouts for ZeRO, FSDP1 and fairscale FSDP,
``oss`` for fairscale OSS). Everything that follows,
statistics, g-SNR and the per-piece scale applied every step, is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch.distributed as dist
from torch import Tensor, nn

from sai_dist.names import unwrapped_name
from sai_dist.stats import Piece, Source


class LayoutError(RuntimeError):
    """A tensor reached the optimizer that its layout cannot map onto model blocks."""


class Origin(NamedTuple):
    """Where one piece's elements sit in their original parameter (see
    :meth:`Layout.element_origin`): that parameter's element count and the index, in its
    flattened (row-major) form, of the piece's first element; the rest follow contiguously."""

    numel: int
    offset: int


# Attribute FSDP1 (FullyShardedDataParallel) sets on every tensor it flattens, flat
# parameters and the views it hands out with use_orig_params=True alike.
_FSDP1_FLATTENED = "_fsdp_flattened"
# Attribute fairscale's FullyShardedDataParallel sets on every parameter it manages (flat
# or not, sharded or not): the tensor is a 1-D shard, padded, maybe mixing parameters.
_FAIRSCALE_SHARDED = "_is_sharded"


def refuse_flat_params(param: Tensor) -> None:
    """Raise :class:`LayoutError` for a tensor FSDP1 or fairscale FSDP manages, reaching a
    layout that maps tensors one-to-one onto blocks: its g-SNR would be that of a flat
    shard (padding included, maybe mixing several parameters), not of a parameter. Those
    wrappers need the flat-parameter layout, built from the wrapped model."""
    if getattr(param, _FSDP1_FLATTENED, False):
        wrapper = "FSDP1 (torch FullyShardedDataParallel)"
    elif hasattr(param, _FAIRSCALE_SHARDED):
        wrapper = "fairscale FullyShardedDataParallel"
    else:
        return
    raise LayoutError(
        f"SGDSaI was given a parameter flattened by {wrapper}, shape {tuple(param.shape)}: mapped one "
        "tensor to one block, its g-SNR would be computed on a flat shard, not on the model's parameters. "
        "Pass the flat-parameter layout built from the wrapped model: "
        "SGDSaI(model.parameters(), ..., layout=sai_dist.layouts.flat_param_layout(model))."
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

    @property
    def model_group(self) -> dist.ProcessGroup | None:
        """A group holding every part of the model when the tensors are one part of it
        (pipeline stages on sub-meshes of one root mesh): the normaliser is reduced over
        it (:mod:`sai_dist.whole_model`). Default ``None``: the tensors are the whole model."""
        return None

    def uncovered_stages(self, ranks: Sequence[int]) -> list[tuple[int, ...]] | None:
        """For tensors that are one part of a model whose parts this layout can locate
        (DTensor stages on sub-meshes of one root mesh): the stages none of ``ranks`` holds,
        so that a ``pipeline_group`` over ``ranks`` would leave them out of the normaliser
        (:func:`sai_dist.whole_model.check_pipeline_group`). Default ``None``: this layout
        cannot say, and the group is checked as a plain process group."""
        return None

    @property
    def late_group(self) -> dist.ProcessGroup | None:
        """Process group for the statistics of blocks whose first gradient arrives after
        step 1. Default: :attr:`group`. A layout where such a step may find fresh blocks on
        some ranks only, each held whole by its rank (fairscale OSS), returns ``None`` so no
        rank waits in a collective the others never join."""
        return self.group

    def block_eps(self, eps: Tensor) -> Tensor:
        """Per-block epsilon ``[num_blocks]`` (float64), NaN where this rank's param groups
        do not say; filled here for blocks the layout knows better (OSS: blocks owned by
        other ranks, whose g-SNR enters the normalising max on every rank). Default: as is."""
        return eps

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

    #: Whether the tensors each rank of :attr:`group` steps differ by design (fairscale OSS:
    #: a different subset of whole blocks; FSDP1 with ``use_orig_params``: views that are
    #: empty on some ranks and get no gradient there): then the sizes of this rank's param
    #: groups, which of its tensors have gradients and the state it loads are not compared
    #: by SGDSaI's cross-rank check; hyperparameters and :meth:`signature` still are.
    ranks_hold_different_params: bool = False

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

    def element_origin(self, param: Tensor) -> list[Origin] | None:
        """Where the elements of ``param``'s pieces sit in their original parameters: one
        :class:`Origin` per piece, in :meth:`pieces` order, ``(numel, offset)`` = the
        element count of the piece's own original parameter (pieces of a flat tensor belong
        to different parameters) and the index of the piece's first element in it, the
        rest following contiguously. Stochastic rounding and int8 momentum are keyed on
        that index and the small-tensor rule looks at that count (:mod:`sai_dist.momentum`),
        so both are the same on every mesh. ``None`` when this layout cannot say; they are
        then refused by name."""
        return None

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

    # -- the g-SNR table (sai_dist.table) -------------------------------------------
    #
    # gsnr_table walks the optimizer's tensors and their pieces itself; a layout says only
    # who must be asked (table_group), whether the answer may be kept (keeps_table) and
    # which rows of a model are its blocks (block_of, table_rows).

    @property
    def table_group(self) -> dist.ProcessGroup | None:
        """Group over which the g-SNR table combines (MAX) the per-block g-SNR and scale
        found in each rank's optimizer state, so that every rank reports every block.
        Needed where a rank's state holds only the blocks or segments it steps (flat
        partitions, OSS owners): the table is then collective over it. Default ``None``:
        every rank's state already holds the value of every block it steps (whole tensors,
        DTensor shards: g-SNR is reduced before it is stored), so no collective."""
        return None

    #: Whether the combined table may be kept in :attr:`table_cache` and read from there,
    #: so that the table costs no collective once it is known. Only for a layout whose
    #: integration refreshes it at points where every rank is present (DeepSpeed: after the
    #: step that fixes g-SNR and after each load, :mod:`sai_dist.deepspeed`). Default
    #: ``False``: combined afresh on every call.
    keeps_table: bool = False
    #: The kept table (``[num_blocks, 3]`` float64: g-SNR, scale, present), or ``None``.
    #: Written only by :mod:`sai_dist.table`; an integration sets it to ``None`` when the
    #: state it summarises changes.
    table_cache: Tensor | None = None

    def block_of(self, param: Tensor) -> int | None:
        """The block an original model parameter is, or ``None`` when it is not one of
        this layout's blocks (frozen, never registered, or not held whole). Default: the
        one whole-block piece of ``param`` as a stepped tensor."""
        try:
            pieces = self.pieces(param)
        except LayoutError:
            return None
        if len(pieces) == 1 and pieces[0].span is None:
            return pieces[0].block
        return None

    def table_rows(self, model: nn.Module) -> list[tuple[str, int, int]]:
        """``(name, block, numel)`` for every parameter of ``model`` that is one of this
        layout's blocks, in the model's order; ``name`` as the unwrapped model spells it
        (:func:`sai_dist.names.unwrapped_name`), ``numel`` the whole block's. Default: from
        ``model.named_parameters()`` and :meth:`block_of`."""
        rows = []
        for name, p in model.named_parameters():
            block = self.block_of(p)
            if block is not None:
                rows.append((unwrapped_name(model, name), block, p.numel()))
        return rows
