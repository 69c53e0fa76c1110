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
gradient yet when it was saved. :func:`load` templates exactly the entries the checkpoint
holds. :func:`optimizer_state_template` is for the plain recipe: a full template from the
live optimizer (zero momentum DTensors with each parameter's own placements, scalar
placeholders) to pass to your own ``dcp.load``.

One implementation for the library and the job (:mod:`sai_dist.train.run_checkpoints` adds
only the run folder around it): :func:`save` and :func:`load` take any torch optimizer;
SGD-SaI's extras (``optim_groups``, int8 scales as a table of runs) apply when the
optimizer is one.

int8 momentum (:mod:`sai_dist.momentum`): the codes are saved as the buffer (a DTensor
shard, resharded by DCP); the per-rank block scales, whose blocks start at each rank's
shard, are saved as one replicated table of runs of the original parameter
(``momentum_run_start``, ``momentum_run_scale``: :data:`RUN_START`, :data:`RUN_SCALE`),
so any mesh can read them. :func:`load` gives each rank its own blocks back: as saved
where they coincide (bit-identical resume), re-encoded to nearest from the decoded local
shard where they do not (within half a new step). A checkpoint of another
``momentum_dtype`` is converted to the optimizer's, to nearest (exact into float32).
:func:`load` builds its template from the checkpoint's metadata (every saved entry with its
saved dtype and shape; state tensors of a parameter's shape templated by the parameter,
so DCP reshards into the current layout) and reads into *copies*: nothing live is written
until the whole checkpoint was read, so a read failing half-way raises
:class:`CheckpointReadError` with the model and optimizer exactly as they were.

Recipe (every rank calls both, as with any DCP call)::

    sai_dist.checkpoint.save(path, model, optimizer)          # at 4 ranks
    ...
    sai_dist.checkpoint.load(path, model, optimizer)          # at 2 ranks, or 1 process
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from sai_dist import momentum as lowp
from sai_dist.layouts.dtensor import DTensorLayout
from sai_dist.layouts.replicated import ReplicatedLayout
from sai_dist.optimizer import SGDSaI
from sai_dist.probe import is_placeholder
from sai_dist.state_keys import GSNR, GSNR_MAX, MOMENTUM, MOMENTUM_SCALE, ROUNDING_STEP, SCALE
from sai_dist.table import find_sgdsai
from sai_dist.warning_categories import StateWithoutGsnrWarning, ZeroGradientStepWarning

__all__ = ["CheckpointReadError", "load", "optimizer_state_template", "save", "state_dict"]


class CheckpointReadError(RuntimeError):
    """Reading a checkpoint failed part-way; nothing was loaded into the model or optimizer."""


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


def _sgdsai_or_none(optimizer: Any) -> SGDSaI | None:
    """The :class:`SGDSaI` inside ``optimizer`` (itself or a wrapper's), else ``None``: any
    other torch optimizer is checkpointed the plain DCP way."""
    try:
        return find_sgdsai(optimizer)
    except (TypeError, ValueError):
        return None


def _reshard(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters again where a forward left unsharded ones.

    FSDP2 keeps the root module unsharded after a forward (``reshard_after_forward`` is off
    for the root), and an eval forward leaves every module so: the module then holds plain
    unsharded tensors, not the DTensors the optimizer steps, and the optimizer's state
    cannot be named by the module's parameters. ``FSDPModule.reshard`` is FSDP2's own way
    back (what its state-dict hooks do before a model state dict)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def state_dict(model: nn.Module, optimizer: Any, *, flatten: bool = False) -> dict[str, Any]:
    """``{"model": ..., "optim": ..., "optim_groups": ...}`` as DCP saves them: sharded,
    FQN-keyed (``optim_groups``, for SGD-SaI only: see :func:`_per_parameter_groups`).

    ``flatten``: the optimizer state in torch's flat form (``state.<fqn>.<key>``,
    ``param_groups.<fqn>.<key>``; ``StateDictOptions(flatten_optimizer_state_dict=True)``,
    as torchtitan saves pipeline stages), which keys param groups by parameter for any
    optimizer, so no ``optim_groups`` is needed."""
    _reshard(model)
    opt = _sgdsai_or_none(optimizer)
    target = optimizer if opt is None else opt
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    osd = _quiet_probe(lambda: get_optimizer_state_dict(model, target, options=options))
    out = {_MODEL: get_model_state_dict(model), _OPTIM: osd}
    if opt is not None and opt.momentum_dtype == "int8":
        _int8_runs_for_save(osd, flatten, out[_MODEL], opt)
    if opt is not None and not flatten:
        out[_GROUPS] = _per_parameter_groups(osd)
    return out


def optimizer_state_template(model: nn.Module, optimizer: Any, metadata: Any | None = None) -> dict[str, Any]:
    """An optimizer state dict DCP can load SGD-SaI state into, for the plain recipe
    (``dcp.load({"optim": optimizer_state_template(...)}, ...)``; :func:`load` builds its
    template from the checkpoint instead).

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
    ``momentum_dtype`` where they differ. int8 checkpoints written by :func:`save` carry
    their scales as a table of runs that only :func:`load` turns into per-rank scales: on
    this path ``load_state_dict`` refuses their codes by name (no ``momentum_scale``).
    """
    saved = {} if metadata is None else metadata.state_dict_metadata
    opt: SGDSaI = find_sgdsai(optimizer)
    _reshard(model)
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


def save(
    checkpoint_id: str, model: nn.Module, optimizer: Any, *, flatten: bool = False, **kwargs: Any
) -> None:
    """Save model and optimizer with ``dcp.save``; ``flatten``: see :func:`state_dict`
    (:func:`load` tells the two forms apart by itself); ``kwargs`` go to ``dcp.save``
    (storage_writer, process_group, ...). int8 momentum is saved as its codes (sharded like
    the parameter) and a table of scale runs (:func:`_int8_runs_for_save`)."""
    opt = _sgdsai_or_none(optimizer)
    if opt is not None:
        _refuse_sharded_int8(opt)
    _dcp(dcp.save, state_dict(model, optimizer, flatten=flatten), checkpoint_id, kwargs)


def _world(opt: SGDSaI) -> int:
    group = opt.layout.group
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _refuse_sharded_int8(opt: SGDSaI) -> None:
    """int8 momentum is checkpointed where each stepped tensor's local buffer is one
    contiguous run of its parameter (FSDP2/HSDP shards on dim 0, whole parameters):
    :class:`~sai_dist.layouts.dtensor.DTensorLayout` and
    :class:`~sai_dist.layouts.replicated.ReplicatedLayout`. Flat-parameter layouts (FSDP1,
    ZeRO) are refused on every rank alike, before anything is written."""
    if opt.momentum_dtype != "int8" or isinstance(opt.layout, _RUN_LAYOUTS) or _world(opt) == 1:
        return
    raise ValueError(
        "sai_dist.checkpoint.save: momentum_dtype='int8' under a sharded layout "
        f"({type(opt.layout).__name__}) is not supported by the DCP checkpoint (its buffers are not "
        "runs of one parameter each); save opt.state_dict() per rank with torch.save (same-world-size "
        "resume is bit-identical), or shard with FSDP2 (fully_shard), whose int8 state DCP reshards."
    )


# -- int8 scales in a checkpoint: a table of runs, not per-rank blocks ------------------------

#: Saved in place of an int8 buffer's per-rank ``momentum_scale``: the original-element index
#: of each scale's run (int64) and the scales (float32), every rank's runs of the parameter
#: in order (:mod:`sai_dist.momentum`, "mesh-independent int8 scales").
RUN_START = "momentum_run_start"
RUN_SCALE = "momentum_run_scale"
_RUN_LAYOUTS = (DTensorLayout, ReplicatedLayout)


def _entries(optim: dict[str, Any], flat: bool) -> dict[str, dict[str, Any]]:
    """``{fqn: state entry}`` of a nested or flat optimizer state dict. Change a copy of an
    entry and put it back with :func:`_write_entry`: a nested state dict's entries are the
    optimizer's own ``state[p]`` dicts (``Optimizer.state_dict`` does not copy them)."""
    if not flat:
        return optim.get("state", {})
    out: dict[str, dict[str, Any]] = {}
    for key, value in optim.items():
        if key.startswith("state."):
            fqn, _, name = key[len("state.") :].rpartition(".")
            out.setdefault(fqn, {})[name] = value
    return out


def _write_entry(optim: dict[str, Any], flat: bool, fqn: str, entry: dict[str, Any]) -> None:
    if not flat:
        optim["state"][fqn] = entry
        return
    for key in (MOMENTUM, MOMENTUM_SCALE, RUN_START, RUN_SCALE):
        optim.pop(f"state.{fqn}.{key}", None)
    for key, value in entry.items():
        optim[f"state.{fqn}.{key}"] = value


def _origin(opt: SGDSaI, owner: Any, fqn: str) -> tuple[int, int]:
    """``(numel, offset)``: the parameter's size and the original-element index of this
    rank's local tensor of it (one contiguous run under :data:`_RUN_LAYOUTS`)."""
    origin = None
    if isinstance(owner, torch.Tensor) and isinstance(opt.layout, _RUN_LAYOUTS):
        origin = opt.layout.element_origin(owner)
    if origin is None or len(origin) != 1:
        raise ValueError(
            f"sai_dist.checkpoint: the int8 momentum of {fqn} under {type(opt.layout).__name__} is not one "
            "run of its parameter on this rank (tensor parallel, flat parameters); its scales cannot be "
            "described mesh-independently. Use momentum_dtype='bfloat16' or 'float32' there."
        )
    return origin[0].numel, origin[0].offset


def _int8_runs_for_save(osd: dict[str, Any], flat: bool, model_sd: dict[str, Any], opt: SGDSaI) -> None:
    """Replace each int8 buffer's per-rank ``momentum_scale`` by the table of runs of all
    ranks (:data:`RUN_START`, :data:`RUN_SCALE`), gathered in one ``all_gather_object`` over
    the layout's group; replicas (HSDP) hold the same runs and are kept once. The codes stay
    the sharded buffer: DCP writes each element once and reshards it on load."""
    entries = _entries(osd, flat)
    mine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for fqn, entry in entries.items():
        buf = entry.get(MOMENTUM)
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.int8:
            continue
        _, offset = _origin(opt, model_sd.get(fqn), fqn)
        starts = lowp.block_starts(offset, opt.layout.local(buf).numel())
        scales = entry.get(MOMENTUM_SCALE)
        if not isinstance(scales, torch.Tensor) or scales.numel() != starts.numel():
            raise ValueError(
                f"sai_dist.checkpoint.save: the int8 momentum of {fqn} has no {MOMENTUM_SCALE} of "
                f"{starts.numel()} block scales; its state is damaged"
            )
        mine[fqn] = (starts, scales.detach().to("cpu", torch.float32))
    world = _world(opt)
    gathered: list[Any] = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine, group=opt.layout.group)
    for fqn in mine:
        parts = [g[fqn] for g in gathered if fqn in g]
        starts = torch.cat([s for s, _ in parts])
        scales = torch.cat([c for _, c in parts])
        order = torch.argsort(starts, stable=True)
        starts, scales = starts[order], scales[order]
        first = torch.ones_like(starts, dtype=torch.bool)
        first[1:] = starts[1:] != starts[:-1]
        entry = dict(entries[fqn])
        del entry[MOMENTUM_SCALE]
        entry[RUN_START], entry[RUN_SCALE] = starts[first], scales[first]
        _write_entry(osd, flat, fqn, entry)


def _int8_runs_for_load(optim: dict[str, Any], flat: bool, live: dict[str, Any], opt: SGDSaI | None) -> None:
    r"""Turn each loaded table of scale runs into this rank's storage, in the template
    (copies: raising here leaves everything live as it was), one parameter at a time.

    - int8 optimizer, runs equal to this rank's blocks (same mesh, or shards on the same
      block boundaries): codes and scales as saved, bit for bit.
    - int8 optimizer, other runs: the local codes decoded with the saved runs
      (:func:`sai_dist.momentum.decode_runs`, one float32 tensor of the local shard) and
      re-encoded into this rank's blocks rounding to nearest: each element within half of
      its new block's step, :math:`|m' - m| \le s'/2`, of the saved value.
    - another ``momentum_dtype``: the decoded value (exact) in the optimizer's dtype,
      rounded to nearest (bfloat16).
    A checkpoint of int8 momentum is refused by name by any other optimizer."""
    for fqn, saved in list(_entries(optim, flat).items()):
        entry = dict(saved)
        buf = entry.get(MOMENTUM)
        int8 = isinstance(buf, torch.Tensor) and buf.dtype == torch.int8
        if opt is None and (int8 or RUN_START in entry):
            raise ValueError(
                f"sai_dist.checkpoint.load: {fqn} holds int8 SGD-SaI momentum (codes and block scales), "
                "which only SGDSaI can read; load it into SGDSaI, or resave it with momentum_dtype='float32'"
            )
        if RUN_START not in entry and RUN_SCALE not in entry:
            continue
        assert opt is not None
        starts, scales = entry.pop(RUN_START, None), entry.pop(RUN_SCALE, None)
        owner = live.get(fqn)
        if not int8:
            raise ValueError(
                f"sai_dist.checkpoint.load: {fqn} has int8 scale runs but its {MOMENTUM} is not int8 codes; "
                "the checkpoint is damaged"
            )
        numel, offset = _origin(opt, owner, fqn)
        lowp.check_runs(starts, scales, numel, fqn)
        local = opt.layout.local(buf)
        n = local.numel()
        target = lowp.storage_dtype(opt.momentum_dtype, numel, owner.dtype)
        rows = lowp.runs_match(starts, numel, offset, n) if target == torch.int8 else None
        if rows is not None:
            entry[MOMENTUM_SCALE] = scales[rows].clone()
        else:
            value = lowp.decode_runs(local, offset, starts, scales)
            if target == torch.int8:
                entry[MOMENTUM_SCALE] = torch.empty(
                    lowp.num_scales([n]), dtype=torch.float32, device=local.device
                )
                lowp.encode(value, local, entry[MOMENTUM_SCALE], None)  # codes rewritten in place
            else:
                out = torch.empty_like(buf, dtype=target)  # a DTensor keeps its placements
                opt.layout.local(out).copy_(value.view(local.shape))
                entry[MOMENTUM] = out
            del value
        _write_entry(optim, flat, fqn, entry)


def _set_path(root: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
    """``root[path[0]][path[1]]... = value``, making dicts (lists for integer keys) on the way,
    as DCP's planner flattened the saved state dict into ``path``."""
    node: Any = root
    for key, nxt in itertools.pairwise(path):
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _is_flat(metadata: Any) -> bool:
    """Whether the checkpoint holds the optimizer state in torch's flat form
    (``optim`` -> ``"state.<fqn>.<key>"``: one path element under it, not nested)."""
    return any(path[0] == _OPTIM and len(path) == 2 for path in metadata.planner_data.values())


def _template_value(item: Any, owner: torch.Tensor | None) -> Any:
    """What DCP reads one saved entry into: ``None`` for a Python value (DCP fills it in); a
    tensor of its parameter's shape as ``zeros_like`` of the parameter (a DTensor keeps its
    mesh and placements, so DCP reshards into the current layout); otherwise a plain tensor
    of the saved size. Always the saved dtype (int8 codes stay int8)."""
    if isinstance(item, BytesStorageMetadata):
        return None
    dtype = item.properties.dtype
    if owner is not None and tuple(owner.shape) == tuple(item.size):
        return torch.zeros_like(owner, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.empty(tuple(item.size), dtype=dtype)


def _saved_optimizer_template(metadata: Any, params: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": ..., "optim_groups": ...}`` shaped like what the checkpoint holds for the
    model whose state dict is ``params``, for any optimizer: exactly the saved entries, each with its saved
    dtype and shape (:func:`_template_value`), nested or flat as saved.

    Entries of parameters this model does not hold (other pipeline stages') are left out,
    and so are entries the checkpoint lacks (a parameter that had no gradient yet when it
    was saved), so such a parameter fixes g-SNR at its first gradient as in an
    uninterrupted run.
    """
    template: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        path = metadata.planner_data[key]
        if path[0] == _OPTIM and len(path) == 2:  # flat: "state.<fqn>.<key>", "param_groups.<fqn>.<key>"
            section, _, rest = str(path[1]).partition(".")
            fqn = rest.rpartition(".")[0]
            if fqn not in params:
                continue
            owner = params[fqn] if section == "state" else None
            template.setdefault(_OPTIM, {})[path[1]] = _template_value(item, owner)
            continue
        if path[0] == _OPTIM and len(path) >= 4 and path[1] == "state":
            if path[2] not in params:
                continue
            value = _template_value(item, params[path[2]])
        elif path[0] == _GROUPS:
            if path[1] not in params:
                continue
            value = _template_value(item, None)
        elif path[0] == _OPTIM:
            value = _template_value(item, None)
        else:
            continue
        _set_path(template, path, value)
    return template


def load(checkpoint_id: str, model: nn.Module, optimizer: Any, **kwargs: Any) -> None:
    """Load what :func:`save` wrote into ``model`` and ``optimizer``, at any world size.

    Contract: the checkpoint is read completely into copies (model tensors cloned, the
    optimizer's template from the checkpoint's metadata, :func:`_saved_optimizer_template`)
    before anything live changes; a read that fails raises :class:`CheckpointReadError` and
    leaves model and optimizer untouched. Only then are model and optimizer set. Param
    groups come back per parameter where the checkpoint has them (``optim_groups``, or a
    flat state dict; older checkpoints hold only the by-index groups, which are right for
    one stage). Each rank reads only its own model's parameters' entries (a pipeline
    stage, its own).
    ``kwargs`` go to ``dcp.load`` (storage_reader, process_group, ...).
    """
    _reshard(model)
    opt = _sgdsai_or_none(optimizer)
    target = optimizer if opt is None else opt
    reader = kwargs.get("storage_reader")
    metadata = (reader if reader is not None else dcp.FileSystemReader(checkpoint_id)).read_metadata()
    live = get_model_state_dict(model)  # once: the template and the model copy below use it
    template = _saved_optimizer_template(metadata, live)
    per_parameter = opt is not None and _GROUPS in template
    if per_parameter:
        # Pipeline stages each saved their own groups under the same index, of which DCP
        # kept one rank's: read the per-parameter copy instead.
        template.get(_OPTIM, {}).pop("param_groups", None)
    # Copies, not the model's own tensors (get_model_state_dict aliases the parameters, and
    # dcp.load fills tensors one by one).
    template[_MODEL] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in live.items()}
    try:
        _dcp(dcp.load, template, checkpoint_id, kwargs)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise CheckpointReadError(
            f"{checkpoint_id}: reading the checkpoint failed, nothing was loaded "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    flat = _is_flat(metadata)
    optim = template.get(_OPTIM, {})
    if not flat:
        optim.setdefault("state", {})
    # Before anything live is set: a refusal here leaves model and optimizer as they were.
    _int8_runs_for_load(optim, flat, live, opt)
    if per_parameter:
        live_groups = _quiet_probe(get_optimizer_state_dict, model, opt)["param_groups"]
        optim["param_groups"] = _regroup(live_groups, template[_GROUPS])
    set_model_state_dict(model, template[_MODEL])
    with warnings.catch_warnings():
        has_state = any(k.startswith("state.") for k in optim) if flat else bool(optim["state"])
        if not has_state:
            # The checkpoint really holds no SGD-SaI state (saved before the first step).
            warnings.simplefilter("ignore", StateWithoutGsnrWarning)
        # Not strict: entries absent from the checkpoint (a parameter that had no gradient
        # when it was saved) are absent on purpose; strict DCP refuses a partial state.
        options = StateDictOptions(strict=False, flatten_optimizer_state_dict=flat)
        _quiet_probe(lambda: set_optimizer_state_dict(model, target, optim, options=options))
