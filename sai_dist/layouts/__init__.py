"""Layouts: how each sharding wrapper's tensors map onto blocks of the original model.

See :mod:`sai_dist.layouts.base` for the contract. :func:`auto_layout` picks the layout a
plain ``SGDSaI(model.parameters())`` needs; integrations that rebind the optimizer's
tensors (DeepSpeed ZeRO, fairscale OSS) attach theirs, and FSDP1 / fairscale FSDP models
take ``layout=flat_param_layout(model)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from sai_dist.layouts.base import Layout, LayoutError, Origin
from sai_dist.layouts.flat_param import flat_param_layout
from sai_dist.layouts.replicated import ReplicatedLayout


def auto_layout(params: Iterable[Tensor]) -> Layout:
    """The layout for parameters as a user's model holds them: DTensors (FSDP2, HSDP,
    tensor parallel) get the DTensor layout, plain tensors (single process, DDP) the
    replicated one."""
    if any(isinstance(p, DTensor) for p in params):
        from sai_dist.layouts.dtensor import DTensorLayout

        return DTensorLayout()
    return ReplicatedLayout()


def follows_rebinding(layout: Layout, params: Sequence[Tensor]) -> bool:
    """Whether an automatic ``layout`` must be rebuilt for ``params`` (the optimizer's
    param groups now, in order): some are unknown to it, and the rebinding is one to one:
    every tensor is an ``nn.Parameter`` with the (global) shape of the block registered at
    its position. That is a model sharded after its optimizer was built, with the groups
    swapped for the new DTensor parameters (accelerate's FSDP2 prepare does this), and a
    fresh :func:`auto_layout` maps them onto the same blocks.

    Anything else is not followed and keeps raising :class:`LayoutError` when stepped: a
    wrapper's flat partitions (other shapes; DeepSpeed ZeRO's are plain tensors) have a
    g-SNR that is not the model's. Only valid before g-SNR is fixed: state then is keyed
    by the tensors it was computed for.
    """
    unique = list({id(p): p for p in params}.values())
    unknown = False
    for p in unique:
        try:
            layout.pieces(p)
        except LayoutError:
            unknown = True
    if not unknown or not all(isinstance(p, nn.Parameter) for p in unique):
        return False
    return [tuple(p.shape) for p in unique] == layout.signature()


__all__ = [
    "Layout",
    "LayoutError",
    "Origin",
    "ReplicatedLayout",
    "auto_layout",
    "flat_param_layout",
    "follows_rebinding",
]
