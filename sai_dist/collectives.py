"""Collective helpers shared by the statistics, layouts, consistency check and integrations.

Bottom layer: imports only torch. Every collective in sai_dist goes through here so the
device choice (NCCL reduces CUDA tensors only, gloo prefers CPU ones) and the "no group
means local" rule are written once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce", "collective_device", "is_distributed"]


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Device a buffer must be on to be reduced over ``group`` (``None``: the default group).

    NCCL reduces CUDA tensors only (the current CUDA device); every other backend gets CPU.
    """
    backend = dist.get_backend(group)
    if backend == "nccl" or (isinstance(backend, str) and "nccl" in backend and "gloo" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    """True when ``group`` spans more than one rank of an initialised process group.

    ``None`` means "local": the values on this rank are already the whole answer.
    """
    if group is None or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(group) > 1


def all_reduce(
    buf: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> Tensor:
    """``op``-reduce the CPU tensor ``buf`` over ``group`` and return the result on CPU.

    Contract: with ``group`` ``None``, an uninitialised process group or a one-rank group,
    ``buf`` itself is returned (reducing over one rank is the identity). Otherwise every rank
    of ``group`` must call this together with a buffer of the same shape and dtype; the
    buffer is moved to :func:`collective_device`, reduced, and a CPU copy returned
    (``buf`` is not modified when it had to move; callers use the return value).
    """
    if not is_distributed(group):
        return buf
    moved = buf.to(collective_device(group))
    dist.all_reduce(moved, op=op, group=group)
    return moved.cpu()
