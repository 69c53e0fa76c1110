"""What ``SGDSaI.load_state_dict`` does around ``torch.optim``'s own load.

``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to its
parameter's dtype and device. For SGD-SaI that would round the g-SNR scalars of a bf16
parameter (``gsnr``, ``scale``, ``gsnr_max`` are CPU float32 by contract) and cast int8
momentum codes, a bf16 buffer, its block scales or a flat tensor's float32 ``momentum_small``.
So those entries are set aside before
(:func:`set_aside`) and put back after (:func:`put_back`): the scalars as CPU float32, the
momentum storage through :func:`sai_dist.momentum.restore_loaded` (converted when it was
saved with another ``momentum_dtype``). Everything else takes torch's path unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sai_dist import momentum as lowp
from sai_dist.layouts.base import Layout
from sai_dist.state_keys import GSNR, GSNR_MAX, MOMENTUM, MOMENTUM_SCALE, MOMENTUM_SMALL, ROUNDING_STEP, SCALE

__all__ = ["Kept", "put_back", "set_aside"]

#: Per saved parameter id: ``(scalars, storage)`` taken out of its state entry.
Kept = dict[Any, tuple[dict[str, Any], dict[str, Any]]]


def set_aside(
    state_dict: dict[str, Any], params: Sequence[Tensor], momentum_dtype: str | None
) -> tuple[dict[str, Any], Kept]:
    """A copy of ``state_dict`` without the entries torch would cast, and those entries.

    ``params`` are the optimizer's tensors in param-group order (the saved ids follow the
    same order). A momentum buffer stays in (torch's path) only where it is kept as is:
    ``momentum_dtype`` is ``None`` and the buffer has its parameter's dtype.
    """
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    dtypes = dict(zip(saved_ids, (p.dtype for p in params), strict=True))
    kept: Kept = {}
    stripped: dict[Any, Any] = {}
    for key, entry in state_dict["state"].items():
        buf = entry.get(MOMENTUM)
        keep_buf = momentum_dtype is None and (buf is None or buf.dtype == dtypes.get(key))
        extra = (MOMENTUM_SCALE, MOMENTUM_SMALL, ROUNDING_STEP)
        moved = extra if keep_buf else (MOMENTUM, *extra)
        storage = {k: entry[k] for k in moved if k in entry}
        scalars = {k: entry[k] for k in (GSNR, SCALE, GSNR_MAX) if k in entry}
        stripped[key] = {k: v for k, v in entry.items() if k not in storage and k not in scalars}
        kept[key] = (scalars, storage)
    return {**state_dict, "state": stripped}, kept


def put_back(
    state: dict[Tensor, dict[str, Any]],
    saved_groups: Sequence[dict[str, Any]],
    params: Sequence[Tensor],
    kept: Kept,
    layout: Layout,
    momentum_dtype: str | None,
) -> None:
    """Restore what :func:`set_aside` took into the loaded ``state``: the g-SNR scalars as
    CPU float32, the momentum storage in this optimizer's ``momentum_dtype``."""
    saved_ids = (i for g in saved_groups for i in g["params"])
    for saved_id, param in zip(saved_ids, params, strict=True):
        scalars, storage = kept.get(saved_id, ({}, {}))
        for k, v in scalars.items():
            state[param][k] = torch.as_tensor(v).detach().to("cpu", torch.float32)
        if storage:
            lowp.restore_loaded(state[param], storage, layout, param, momentum_dtype)
