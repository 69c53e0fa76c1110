"""Sharded checkpoints of a model and its :class:`~sai_dist.SGDSaI` with
``torch.distributed.checkpoint`` (DCP), resharding across world sizes.

What is saved per parameter (FQN keys, as ``get_optimizer_state_dict`` names them):
``momentum_buffer`` (a DTensor shard under FSDP2/HSDP, so DCP reshards it on load) and
the g-SNR scalars ``gsnr``, ``scale``, ``gsnr_max`` (plain replicated CPU tensors, written
once), and each parameter's param-group hyperparameters under ``optim_groups.<fqn>`` (so
pipeline stages, each saving its own parameters, make one checkpoint of the whole model
that any other ``(pp, dp, tp)`` split loads). Loading restores them, so a resumed run never
recomputes g-SNR.

Why a helper and not only ``dcp.load(get_state_dict(model, optimizer))``: that plain recipe
works too (DCP builds its template with a zero-gradient, lr-0 probe step, which SGD-SaI
answers with placeholders of its state's shapes, :mod:`sai_dist.probe`), but strict DCP
refuses a checkpoint that lacks an entry the template has, e.g. a parameter that had no
gradient yet when it was saved. :func:`optimizer_state_template` builds the full template
(zero momentum DTensors with each parameter's own placements, scalar placeholders) and
:func:`load` keeps only the entries the checkpoint actually holds.

Recipe (every rank calls both, as with any DCP call)::

    sai_dist.checkpoint.save(path, model, optimizer)          # at 4 ranks
    ...
    sai_dist.checkpoint.load(path, model, optimizer)          # at 2 ranks, or 1 process
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sai_dist.optimizer import SGDSaI
from sai_dist.probe import is_placeholder
from sai_dist.state_keys import GSNR, GSNR_MAX, MOMENTUM, MOMENTUM_SCALE, ROUNDING_STEP, SCALE
from sai_dist.table import find_sgdsai
from sai_dist.warning_categories import StateWithoutGsnrWarning, ZeroGradientStepWarning

__all__ = ["load", "optimizer_state_template", "save", "state_dict"]

_SCALARS = (GSNR, SCALE, GSNR_MAX)
_MODEL = "model"
_OPTIM = "optim"


def _quiet_probe(fn: Any, *args: Any) -> Any:
    """Run a DCP state-dict call whose zero-gradient probe step SGD-SaI skips; the skip's
    warning is expected here and says nothing about the user's training."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroGradientStepWarning)
        return fn(*args)


_GROUPS = "optim_groups"


def _per_parameter_groups(osd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{fqn: {hyperparameter: value}}`` from a nested optimizer state dict.

    Saved next to the nested ``optim`` entry: that one keys param groups by index
    (``optim.param_groups.0.lr``), and pipeline stages each hold their own groups of other
    parameters under the same index, of which DCP keeps one rank's. Keyed by parameter,
    every stage's groups survive and any other split of the model loads them."""
    return {
        fqn: {k: v for k, v in group.items() if k != "params"}
        for group in osd["param_groups"]
        for fqn in group["params"]
    }


def _regroup(groups: list[dict[str, Any]], values: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The template's param groups with the hyperparameters loaded for their parameters."""
    out = []
    for group in groups:
        group = dict(group)
        if group["params"]:
            group.update(values.get(group["params"][0], {}))
        out.append(group)
    return out


def state_dict(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """``{"model": ..., "optim": ..., "optim_groups": ...}`` as DCP saves them: sharded,
    FQN-keyed (``optim_groups``: see :func:`_per_parameter_groups`)."""
    opt = find_sgdsai(optimizer)
    osd = _quiet_probe(get_optimizer_state_dict, model, opt)
    return {_MODEL: get_model_state_dict(model), _OPTIM: osd, _GROUPS: _per_parameter_groups(osd)}


def optimizer_state_template(model: nn.Module, optimizer: Any, metadata: Any | None = None) -> dict[str, Any]:
    """An optimizer state dict DCP can load SGD-SaI state into.

    Parameters with state keep it (as ``get_optimizer_state_dict`` gives it); every other
    trainable parameter gets placeholders: ``momentum_buffer`` as ``zeros_like`` of the
    parameter (a DTensor keeps its mesh and placements, which is what lets DCP reshard into
    it) in groups with momentum, and 0-d CPU float32 ``gsnr``/``scale``/``gsnr_max`` (one
    value per piece for a tensor holding several blocks).

    Low-precision state (:mod:`sai_dist.momentum`): with the checkpoint's ``metadata``
    (``reader.read_metadata()``), the placeholder takes the dtype the checkpoint saved
    the buffer in (bf16, int8 codes: DCP would otherwise cast codes into a float
    placeholder and they would be misread), plus ``momentum_scale`` of the saved shape and
    ``rounding_step``; ``load_state_dict`` then converts to this optimizer's
    ``momentum_dtype`` where they differ.
    """
    saved = {} if metadata is None else metadata.state_dict_metadata
    opt: SGDSaI = find_sgdsai(optimizer)
    osd = _quiet_probe(get_optimizer_state_dict, model, opt)
    # Per parameter: real state where it exists. (An entry can exist and be empty: a
    # skipped zero-gradient step still indexes the optimizer's state defaultdict.)
    # A probe's placeholders (sai_dist.probe) are not state: they are rebuilt below in the
    # form the checkpoint saved.
    state: dict[str, dict[str, Any]] = {
        fqn: entry for fqn, entry in osd["state"].items() if entry and not is_placeholder(entry)
    }
    for saved_group, group in zip(osd["param_groups"], opt.param_groups, strict=True):
        for fqn, p in zip(saved_group["params"], group["params"], strict=True):
            if not p.requires_grad or fqn in state:
                continue
            n = len(opt.layout.pieces(p))
            shape: tuple[int, ...] = () if n == 1 else (n,)
            entry: dict[str, Any] = {k: torch.zeros(shape, dtype=torch.float32) for k in _SCALARS}
            if group["momentum"] != 0:
                meta = saved.get(f"{_OPTIM}.state.{fqn}.{MOMENTUM}")
                dtype = getattr(getattr(meta, "properties", None), "dtype", None) or p.dtype
                entry[MOMENTUM] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                meta = saved.get(f"{_OPTIM}.state.{fqn}.{MOMENTUM_SCALE}")
                if meta is not None:
                    entry[MOMENTUM_SCALE] = torch.zeros(tuple(meta.size), dtype=torch.float32)
            if f"{_OPTIM}.state.{fqn}.{ROUNDING_STEP}" in saved:
                entry[ROUNDING_STEP] = torch.zeros((), dtype=torch.int64)
            state[fqn] = entry
    osd["state"] = state
    return osd


def _single_process(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Outside a process group DCP runs single-process: say so explicitly."""
    if not (dist.is_available() and dist.is_initialized()):
        kwargs.setdefault("no_dist", True)
    return kwargs


def _dcp(fn: Any, state: dict[str, Any], checkpoint_id: str, kwargs: dict[str, Any]) -> Any:
    """``dcp.save``/``dcp.load``; single-process use is intended here (loading a sharded
    checkpoint into one process is a supported resharding), so DCP's warning about a
    missing process group is silenced."""
    kwargs = _single_process(kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        return fn(state, checkpoint_id=checkpoint_id, **kwargs)


def save(checkpoint_id: str, model: nn.Module, optimizer: Any, **kwargs: Any) -> None:
    """Save model and optimizer with ``dcp.save``; ``kwargs`` go to it (storage_writer,
    process_group, ...)."""
    _refuse_sharded_int8(find_sgdsai(optimizer))
    _dcp(dcp.save, state_dict(model, optimizer), checkpoint_id, kwargs)


def _refuse_sharded_int8(opt: SGDSaI) -> None:
    """int8 block scales are per rank (blocks restart at each shard), which DCP's plain
    replicated tensors cannot hold: refuse, on every rank alike, before writing."""
    if opt.layout.group is None or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size(opt.layout.group) > 1 and opt.momentum_dtype == "int8":
        raise ValueError(
            "sai_dist.checkpoint.save: momentum_dtype='int8' under a sharded layout "
            f"({type(opt.layout).__name__}) is not supported by the DCP checkpoint yet (per-rank block "
            "scales); save opt.state_dict() per rank with torch.save (same-world-size resume is "
            "bit-identical), or use momentum_dtype='bfloat16', which DCP reshards."
        )


def _saved_keys(checkpoint_id: str, storage_reader: Any | None) -> set[str]:
    reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(checkpoint_id)
    return set(reader.read_metadata().state_dict_metadata)


def load(checkpoint_id: str, model: nn.Module, optimizer: Any, **kwargs: Any) -> None:
    """Load what :func:`save` wrote into ``model`` and ``optimizer``, at any world size.

    Optimizer entries the checkpoint does not hold (saved before the first step, a
    parameter that never had a gradient) are left out rather than loaded as placeholders,
    so such parameters fix g-SNR at their first gradient as in an uninterrupted run.
    ``kwargs`` go to ``dcp.load`` (storage_reader, process_group, ...).
    """
    opt = find_sgdsai(optimizer)
    reader = kwargs.get("storage_reader")
    metadata = (reader if reader is not None else dcp.FileSystemReader(checkpoint_id)).read_metadata()
    template = {_MODEL: get_model_state_dict(model), _OPTIM: optimizer_state_template(model, opt, metadata)}
    saved = set(metadata.state_dict_metadata)
    optim_state = template[_OPTIM]["state"]
    for fqn in list(optim_state):
        entry = {k: v for k, v in optim_state[fqn].items() if f"{_OPTIM}.state.{fqn}.{k}" in saved}
        if entry:
            optim_state[fqn] = entry
        else:
            del optim_state[fqn]
    # Param groups by parameter where the checkpoint has them (checkpoints written before
    # hold only the by-index groups, which are right for one stage).
    nested = template[_OPTIM]
    per_parameter = any(k.startswith(f"{_GROUPS}.") for k in saved)
    if per_parameter:
        template[_OPTIM] = {"state": nested["state"]}
        template[_GROUPS] = _per_parameter_groups(nested)
    _dcp(dcp.load, template, checkpoint_id, kwargs)
    set_model_state_dict(model, template[_MODEL])
    if per_parameter:
        groups = _regroup(nested["param_groups"], template[_GROUPS])
        template[_OPTIM] = {"state": template[_OPTIM]["state"], "param_groups": groups}
    with warnings.catch_warnings():
        if not optim_state:
            # The checkpoint really holds no SGD-SaI state (saved before the first step).
            warnings.simplefilter("ignore", StateWithoutGsnrWarning)
        # Not strict: the entries left out above (a parameter that had no gradient when the
        # checkpoint was saved) are absent on purpose; strict DCP refuses a partial state.
        options = StateDictOptions(strict=False)
        _quiet_probe(lambda: set_optimizer_state_dict(model, opt, template[_OPTIM], options=options))
