"""What ``SGDSaI.load_state_dict`` does around ``torch.optim``'s own load.

``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to its
parameter's dtype and device. For SGD-SaI that would round the g-SNR scalars of a bf16
parameter (``gsnr``, ``scale``, ``gsnr_max`` are CPU float32 by contract) and cast int8
momentum codes, a bf16 buffer, its block scales or a flat tensor's float32 ``momentum_small``.
So those entries are set aside before
(:func:`set_aside`) and put back after (:func:`put_back`): the scalars as CPU float32, the
momentum storage through :func:`sai_dist.momentum.restore_loaded` (converted when it was
saved with another ``momentum_dtype``). Everything else takes torch's path unchanged.
:func:`load_state_dict` is the whole load, checks and cross-rank agreement first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sai_dist import consistency, validation
from sai_dist import momentum as lowp
from sai_dist.gsnr_step import options
from sai_dist.layouts.base import Layout
from sai_dist.probe import drop_placeholders, is_placeholder
from sai_dist.state_keys import GSNR, GSNR_MAX, MOMENTUM, MOMENTUM_SCALE, MOMENTUM_SMALL, ROUNDING_STEP, SCALE
from sai_dist.warning_categories import StateWithoutGsnrWarning, warn

__all__ = ["Kept", "load_state_dict", "put_back", "set_aside"]

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


def load_state_dict(
    opt: Any, state_dict: dict[str, Any], torch_load: Callable[[dict[str, Any]], None]
) -> None:
    """``SGDSaI.load_state_dict`` (its docstring says what it refuses) for ``opt``, with
    ``torch_load`` torch's own load: the checks and the cross-rank agreement first, nothing
    modified on a refusal; then the g-SNR entries set aside around torch's cast and put
    back; a probe's placeholders dropped; a warning for real state without g-SNR."""
    refusal: Exception | None = None
    try:
        validation.check_loadable(state_dict, opt.param_groups, opt.defaults, opt.layout)
    except Exception as e:
        refusal = e
    check = consistency.check_group(opt.layout, opt.check_ranks)
    if check is not None:
        if refusal is None:
            fields = consistency.load_fingerprint(
                opt.layout, opt.param_groups, opt.defaults, options(opt), state_dict
            )
        else:  # what this rank has; the refusal itself is what peers are told
            fields = consistency.step_fingerprint(
                opt.layout, opt.param_groups, options(opt), opt.gsnr_max(), None
            )
            fields["call"] = "load_state_dict"
        text = None if refusal is None else f"{type(refusal).__name__}: {refusal}"
        consistency.check_ranks(check, fields, refusal=text, when="load_state_dict")
    if refusal is not None:
        raise refusal
    # Real state (not a probe's placeholders) loaded, to tell a bad checkpoint below.
    real_entries = any(entry and not is_placeholder(entry) for entry in state_dict["state"].values())
    params = [p for g in opt.param_groups for p in g["params"]]
    for_torch, kept = set_aside(state_dict, params, opt.momentum_dtype)
    torch_load(for_torch)
    saved_groups = for_torch["param_groups"]
    put_back(opt.state, saved_groups, params, kept, opt.layout, opt.momentum_dtype)
    # Placeholders (sai_dist.probe) the checkpoint did not overwrite: it was saved before
    # step 1, or these tensors had no gradient yet. Either way their g-SNR is not fixed.
    drop_placeholders(opt.state)
    if not opt.initialized and real_entries:
        # State without g-SNR (momentum, say) is not a checkpoint SGD-SaI wrote: some tool
        # assembled it from a template that held no SGD-SaI state. An empty state (a fresh
        # optimizer's own, round-tripped by accelerate) or placeholders only (saved before
        # step 1) are legitimate and load silently.
        warn(
            "SGDSaI.load_state_dict: the state dict holds optimizer state but no g-SNR, so the next "
            "step fixes g-SNR from a fresh gradient and the loaded momentum is not what the saved "
            "run had. It was not written by SGDSaI.state_dict (a template without SGD-SaI's keys?): "
            "save and load with the optimizer's own state_dict, DCP's state-dict helpers or "
            "sai_dist.checkpoint.",
            StateWithoutGsnrWarning,
        )
