"""Layouts: how each sharding wrapper's tensors map onto blocks of the original model.

See :mod:`sai_dist.layouts.base` for the contract. :func:`auto_layout` picks the layout a
plain ``SGDSaI(model.parameters())`` needs; integrations that rebind the optimizer's
tensors (DeepSpeed ZeRO, fairscale OSS) attach theirs, and FSDP1 / fairscale FSDP models
take ``layout=flat_param_layout(model)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor
from torch.distributed.tensor import DTensor

from sai_dist.layouts.base import Layout, LayoutError
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


__all__ = ["Layout", "LayoutError", "ReplicatedLayout", "auto_layout", "flat_param_layout"]
