r"""DeepSpeed integration: ``"type": "SGDSaI"`` in a DeepSpeed config, any ZeRO stage.

Two ways in, one mechanism:

* ``sai_dist.deepspeed.initialize(...)``: a drop-in for ``deepspeed.initialize`` (same
  arguments, same return value) that also sets the config switches SGD-SaI needs.
* Code that calls ``deepspeed.initialize`` itself (Hugging Face Trainer, Lightning, a
  training script you do not own): ``import sai_dist.deepspeed`` once before it. The
  import registers ``torch.optim.SGDSaI`` (DeepSpeed resolves an unknown optimizer
  ``type`` with ``getattr(torch.optim, type)``), adds SGD-SaI to ZeRO's list of supported
  optimizers, and hooks ``DeepSpeedEngine._configure_optimizer`` so that whichever wrapper
  DeepSpeed builds around an :class:`~sai_dist.SGDSaI` gets the matching layout.

What the hook attaches (see :mod:`sai_dist.layouts.zero` for the maps):

* a :class:`~sai_dist.layouts.flat_segment.FlatSegmentLayout` mapping the wrapper's flat fp32
  partitions onto the original parameters, so g-SNR is that of the model's parameters;
* for ZeRO-1/2/3, which call the client's ``step()`` once per param group / sub-group,
  a *first-step barrier*: until g-SNR is fixed, those calls are held back and the last
  one steps every group at once, so step 1 sees every block (the normaliser is the max
  over the whole model). Held-back groups are then copied back to the low-precision
  weights exactly as DeepSpeed does after a step. From step 2 on, calls pass straight
  through and issue no collective.

World-size-free checkpoints: :func:`save_optimizer_state` writes, per original
parameter, the fp32 master weight, the momentum buffer and the fixed g-SNR and scale;
:func:`load_optimizer_state` loads that into an engine of any world size and ZeRO stage.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sai_dist import momentum as lowp
from sai_dist.collectives import all_reduce
from sai_dist.layouts.zero import (
    FlatSegmentLayout,
    from_bf16_optimizer,
    from_fp16_unfused,
    from_zero3,
    from_zero12,
)
from sai_dist.optimizer import SGDSaI
from sai_dist.state_keys import GSNR, GSNR_MAX, MOMENTUM, SCALE
from sai_dist.table import block_values, find_sgdsai
from sai_dist.warning_categories import ZeroGradientStepWarning

try:
    import deepspeed as _ds
except ImportError:  # pragma: no cover - exercised on machines without DeepSpeed
    _ds = None

__all__ = [
    "attach",
    "check_config_params",
    "initialize",
    "install",
    "load_optimizer_state",
    "save_optimizer_state",
]

OPTIMIZER_TYPE = "SGDSaI"
CHECKPOINT_FORMAT = "sai_dist.deepspeed.optimizer/1"
_ATTACHED = "_sai_dist_attached"
_INSTALLED = False


def _require_deepspeed() -> Any:
    if _ds is None:
        raise ImportError("sai_dist.deepspeed needs DeepSpeed: pip install 'sai_dist[deepspeed]'")
    return _ds


# -- config validation ---------------------------------------------------------------

# Keyword arguments of SGDSaI a JSON config can set (params and layout are not JSON).
_CONFIG_KEYS = tuple(
    n for n in inspect.signature(SGDSaI.__init__).parameters if n not in ("self", "params", "layout")
)
# Keys other optimizers take in DeepSpeed configs, with what to use instead.
_CONFIG_HINTS = {
    "max_grad_norm": 'clip with DeepSpeed\'s top-level "gradient_clipping" instead',
    "betas": "Adam's betas have no counterpart: SGD-SaI has one momentum",
    "nesterov": "SGD-SaI does not implement Nesterov momentum",
}


def check_config_params(params: Any) -> None:
    """Validate the ``params`` of a DeepSpeed ``"optimizer": {"type": "SGDSaI", "params":
    {...}}`` section before anything is built.

    DeepSpeed passes ``params`` to ``SGDSaI(model_parameters, **params)``; an unknown key
    (a typo such as ``"momentun"``, or another optimizer's option) would surface as a bare
    ``TypeError`` from deep inside engine construction. Raises ``ValueError`` naming every
    unknown key (with the closest SGD-SaI key) or the invalid value, as SGDSaI itself does
    for its arguments. Pure: reads ``params``, builds nothing of the user's.
    """
    if params is None:
        return
    where = 'DeepSpeed config "optimizer": {"type": "SGDSaI", "params": ...}'
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a JSON object, got {type(params).__name__}")
    unknown = [k for k in params if k not in _CONFIG_KEYS]
    if unknown:
        notes = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), _CONFIG_KEYS, n=1, cutoff=0.6)
            hint = _CONFIG_HINTS.get(key) or (
                f"did you mean {close[0]!r}?" if close else "not an SGDSaI option"
            )
            notes.append(f"{key!r} ({hint})")
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(notes)}. SGDSaI accepts: {', '.join(_CONFIG_KEYS)}"
        )
    try:
        # Every value check SGDSaI makes, on a throwaway parameter.
        SGDSaI([torch.nn.Parameter(torch.zeros(1))], **params)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# -- registration ------------------------------------------------------------------


def install() -> None:
    """Make ``"type": "SGDSaI"`` work for any caller of ``deepspeed.initialize``.

    Idempotent; runs on ``import sai_dist.deepspeed``. It (1) sets ``torch.optim.SGDSaI``,
    (2) appends :class:`SGDSaI` to ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS``
    so ZeRO needs no ``zero_allow_untested_optimizer``, (3) wraps
    ``DeepSpeedEngine._configure_optimizer`` to :func:`attach` the layout, and (4) wraps
    ``FP16_UnfusedOptimizer.initialize_optimizer_states``, which steps the client optimizer with
    all-zero gradients during construction, so the layout is attached before that probe
    (which SGD-SaI then skips: it neither fixes g-SNR nor decays weights).
    """
    global _INSTALLED
    ds = _require_deepspeed()
    if _INSTALLED:
        return
    if getattr(torch.optim, OPTIMIZER_TYPE, None) is None:
        setattr(torch.optim, OPTIMIZER_TYPE, SGDSaI)
    from deepspeed.runtime.zero import utils as zero_utils

    if SGDSaI not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(SGDSaI)

    engine_cls = ds.runtime.engine.DeepSpeedEngine
    configure = engine_cls._configure_optimizer

    @functools.wraps(configure)
    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> None:
        if client_optimizer is None and self.optimizer_name() == OPTIMIZER_TYPE:
            # Before DeepSpeed builds SGDSaI from the config: a clear error, nothing built.
            check_config_params(self.optimizer_params())
        configure(self, client_optimizer, model_parameters)
        if isinstance(getattr(self, "basic_optimizer", None), SGDSaI):
            attach(self)

    engine_cls._configure_optimizer = _configure_optimizer

    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    init_states = FP16_UnfusedOptimizer.initialize_optimizer_states

    @functools.wraps(init_states)
    def initialize_optimizer_states(self: Any) -> None:
        if isinstance(self.optimizer, SGDSaI):
            if not isinstance(self.optimizer.layout, FlatSegmentLayout):
                self.optimizer.use_layout(from_fp16_unfused(self, {}))
            with warnings.catch_warnings():
                # The probe's all-zero step is skipped by SGDSaI by design; say nothing.
                warnings.simplefilter("ignore", ZeroGradientStepWarning)
                return init_states(self)
        return init_states(self)

    FP16_UnfusedOptimizer.initialize_optimizer_states = initialize_optimizer_states
    _INSTALLED = True


# -- attaching to an engine ----------------------------------------------------------


def _param_names(module: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


def _wrapper_kind(wrapper: Any) -> str:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(wrapper, SGDSaI):
        return "none"
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(wrapper, BF16_Optimizer):
        return "bf16"
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        return "fp16"
    raise NotImplementedError(
        f"SGDSaI under DeepSpeed: the optimizer wrapper {type(wrapper).__name__} is not supported "
        "(supported: none, FP16_UnfusedOptimizer, BF16_Optimizer, ZeRO stage 1, 2 and 3)"
    )


def _check_supported(zero: Any, kind: str) -> None:
    problems = []
    if getattr(zero, "torch_autocast_gradscaler", None):
        problems.append("torch autocast GradScaler")
    if getattr(zero, "zenflow", False):
        problems.append("ZenFlow")
    if kind == "zero3" and getattr(zero, "swap_optimizer", False):
        problems.append("NVMe optimizer swapping")
    if kind == "zero3" and getattr(zero, "backup_optimizer", None) is not None:
        problems.append("partial optimizer offload (ratio < 1)")
    if problems:
        raise NotImplementedError(f"SGDSaI under DeepSpeed does not support {', '.join(problems)} yet")


def attach(engine: Any) -> SGDSaI:
    """Attach the right layout (and, for ZeRO, the first-step barrier) to the SGD-SaI
    inside ``engine``. Called by the ``_configure_optimizer`` hook; idempotent."""
    sai = engine.basic_optimizer
    if not isinstance(sai, SGDSaI):
        raise TypeError(f"engine's optimizer is {type(sai).__name__}, not SGDSaI")
    wrapper = engine.optimizer
    if getattr(wrapper, _ATTACHED, False):
        return sai
    kind = _wrapper_kind(wrapper)
    _check_supported(wrapper, kind)
    names = _param_names(engine.module)
    if kind == "none":
        # Stage 0 in fp32: DeepSpeed steps the user's tensors directly; the replicated
        # layout SGDSaI picked at construction is already right.
        setattr(wrapper, _ATTACHED, True)
        return sai
    build: Callable[[Any, dict[int, str]], FlatSegmentLayout] = {
        "zero12": from_zero12,
        "zero3": from_zero3,
        "bf16": from_bf16_optimizer,
        "fp16": from_fp16_unfused,
    }[kind]
    layout = build(wrapper, names)
    if isinstance(sai.layout, FlatSegmentLayout):
        # FP16_UnfusedOptimizer attached a nameless layout before its init probe; same segments.
        if sai.initialized:
            raise RuntimeError("SGDSaI: g-SNR was fixed before DeepSpeed finished building the engine")
    sai.use_layout(layout)
    if kind in ("zero12", "zero3"):
        _install_first_step_barrier(wrapper, sai, kind)
    _install_table_refresh(wrapper, sai)
    setattr(wrapper, _ATTACHED, True)
    return sai


def _install_table_refresh(wrapper: Any, sai: SGDSaI) -> None:
    """Keep the layout's cross-rank g-SNR table current: refreshed (one small collective)
    after the step that fixes g-SNR and after loading state, when every rank is there."""
    layout = sai.layout
    assert isinstance(layout, FlatSegmentLayout)
    step = wrapper.step

    @functools.wraps(step)
    def stepped(*args: Any, **kwargs: Any) -> Any:
        was = sai.initialized
        out = step(*args, **kwargs)
        if sai.initialized and (not was or layout.table_cache is None):
            block_values(sai, refresh=True)
        return out

    wrapper.step = stepped
    load = sai.load_state_dict

    @functools.wraps(load)
    def load_state_dict(state_dict: dict[str, Any]) -> None:
        load(state_dict)
        layout.table_cache = None
        if sai.initialized:
            block_values(sai, refresh=True)

    sai.load_state_dict = load_state_dict  # type: ignore[method-assign]


def _install_first_step_barrier(zero: Any, sai: SGDSaI, kind: str) -> None:
    """Hold back ZeRO's per-group ``step()`` calls until all groups have their gradients,
    then step them together, once, while g-SNR is not fixed.

    ZeRO-1/2 call ``_optimizer_step(i)`` for each param group ``i`` in turn, ZeRO-3 for
    each sub-group, each after preparing that group's unscaled, clipped fp32 gradient.
    A held-back group keeps a reference to its gradient (DeepSpeed drops its own); at the
    last call every group's gradient is re-attached and a single ``sai.step()`` over all
    groups fixes g-SNR from every block and updates every group. The fp32 partitions of
    held-back groups are then copied to the low-precision partitions, as DeepSpeed did
    (too early) right after their call.
    """
    flats: list[Tensor] = (
        zero.single_partition_of_fp32_groups if kind == "zero12" else zero.fp32_partitioned_groups_flat
    )
    original = zero._optimizer_step
    held: dict[int, Tensor | None] = {}

    def optimizer_step(i: int) -> None:
        if sai.initialized:
            held.clear()
            return original(i)
        held[i] = flats[i].grad
        if i != len(flats) - 1:
            return None
        try:
            _step_all(zero, sai, kind, flats, held)
        finally:
            held.clear()
        return None

    zero._optimizer_step = optimizer_step


@torch.no_grad()
def _step_all(zero: Any, sai: SGDSaI, kind: str, flats: list[Tensor], held: dict[int, Tensor | None]) -> None:
    before = {i: flats[i].grad for i in held}
    for i, grad in held.items():
        flats[i].grad = grad
    groups = sai.param_groups
    try:
        if kind == "zero12":
            sai.param_groups = [groups[i] for i in sorted(held)]
            sai.step()
        else:
            saved = [g["params"] for g in groups]
            for g in groups:
                g["params"] = []
            for i in sorted(held):
                groups[zero.sub_group_to_group_id[i]]["params"].append(flats[i])
            try:
                sai.step()
            finally:
                for g, params in zip(groups, saved, strict=True):
                    g["params"] = params
    finally:
        sai.param_groups = groups
        for i, grad in before.items():
            flats[i].grad = grad
    last = len(flats) - 1
    for i in sorted(held):
        if i == last:
            continue  # DeepSpeed copies the last group itself, after this call returns
        if kind == "zero12":
            rank = dist.get_rank(group=zero.real_dp_process_group[i])
            zero.parallel_partitioned_bit16_groups[i][rank].data.copy_(flats[i].data)
        else:
            zero._reassign_or_swap_out_partitioned_parameters(i)
    if kind == "zero12":
        zero._lazy_init_hp_params_optimizer_state()


# -- initialize ------------------------------------------------------------------------


def _load_config(config: Any, args: Any) -> tuple[dict[str, Any] | None, Any]:
    """The config as a dict (copied), and ``args`` stripped of ``deepspeed_config`` when
    the config came from there (DeepSpeed refuses a config given twice)."""
    if config is None and args is not None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None
    if config is None:
        return None, args
    if isinstance(config, str | os.PathLike):
        with open(config) as f:
            return json.load(f), args
    if isinstance(config, dict):
        return copy.deepcopy(config), args
    raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def _offloads_optimizer(cfg: dict[str, Any]) -> bool:
    off = cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() not in ("none", "")


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: str | os.PathLike | dict[str, Any] | None = None,
    mesh_param: Any = None,
    config_params: str | dict[str, Any] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with SGD-SaI support; same arguments, same return value
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    The config (dict, JSON path, ``config_params`` or ``args.deepspeed_config``) may say
    ``"optimizer": {"type": "SGDSaI", "params": {...}}`` (any capitalisation); the
    ``params`` are :class:`~sai_dist.SGDSaI`'s keyword arguments. A client ``optimizer``
    that is an :class:`SGDSaI` works too. Either way this sets
    ``zero_allow_untested_optimizer`` and, with ZeRO-Offload, ``zero_force_ds_cpu_optimizer:
    false`` (DeepSpeed asks for them for any optimizer outside its own list), then calls
    ``deepspeed.initialize``. The returned optimizer is DeepSpeed's wrapper; pass it or
    the engine to :func:`sai_dist.gsnr_table`.
    """
    ds = _require_deepspeed()
    install()
    if config is None and config_params is not None:
        config, config_params = config_params, None
    cfg, args = _load_config(config, args)
    if cfg is not None:
        section = cfg.get("optimizer")
        named = isinstance(section, dict) and str(section.get("type", "")).lower() == OPTIMIZER_TYPE.lower()
        if named:
            section["type"] = OPTIMIZER_TYPE
            check_config_params(section.get("params"))
        if named or isinstance(optimizer, SGDSaI):
            cfg.setdefault("zero_allow_untested_optimizer", True)
            if isinstance(optimizer, SGDSaI) and _offloads_optimizer(cfg):
                cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds.initialize(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        distributed_port=distributed_port,
        mpu=mpu,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
        config=cfg,
        mesh_param=mesh_param,
    )


# -- world-size-free checkpoints --------------------------------------------------------


def _sai_and_layout(engine: Any) -> tuple[SGDSaI, FlatSegmentLayout | None]:
    sai = find_sgdsai(engine)
    layout = sai.layout if isinstance(sai.layout, FlatSegmentLayout) else None
    return sai, layout


def _gather_blocks(
    layout: FlatSegmentLayout, local: Callable[[Tensor], Tensor | None]
) -> list[Tensor] | None:
    """Full flattened fp32 copies of every block assembled from the flats' segments;
    ``local(flat)`` returns the flat-shaped tensor to read (``None`` to skip). One
    all-reduce (sum) over the layout's group: segments are disjoint across ranks."""
    numels = layout.block_numels
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + n)
    buf = torch.zeros(starts[-1], dtype=torch.float32)
    have = torch.zeros(1)
    for flat in layout.flats:
        src = local(flat)
        if src is None:
            continue
        have += 1
        src = src.detach().reshape(-1).to("cpu", torch.float32)
        for s in layout.segments(flat):
            lo = starts[s.block] + s.offset
            buf[lo : lo + s.stop - s.start] = src[s.start : s.stop]
    if layout.group is not None:
        both = all_reduce(torch.cat([buf, have]), layout.group)
        buf, have = both[:-1], both[-1:]
    if float(have) == 0:
        return None
    return [buf[starts[b] : starts[b + 1]].clone() for b in range(len(numels))]


def save_optimizer_state(engine: Any, path: str | os.PathLike) -> None:
    """Write SGD-SaI's world-size-free checkpoint: per original parameter (by name), the
    fp32 master weight, the momentum buffer and the fixed g-SNR and scale, plus
    ``gsnr_max`` and the param-group hyper-parameters.

    Collective: every rank calls it; rank 0 writes ``path`` (``torch.save``). Each rank
    assembles full copies of all parameters in CPU memory (4 bytes per element twice).
    Works for every wrapper :func:`attach` supports, at any world size.
    """
    sai, layout = _sai_and_layout(engine)
    names = _param_names(engine.module)
    entries: dict[str, dict[str, Any]] = {}
    if layout is None:
        for group in sai.param_groups:
            for p in group["params"]:
                state = sai.state.get(p, {})
                entry: dict[str, Any] = {"param": p.detach().to("cpu", torch.float32).clone()}
                momentum = lowp.decoded_momentum(state, sai.layout, p)
                if momentum is not None:
                    entry["momentum"] = momentum.detach().to("cpu", torch.float32).clone()
                if GSNR in state:
                    entry["gsnr"], entry["scale"] = float(state[GSNR]), float(state[SCALE])
                entries[_clean(names[id(p)])] = entry
    else:
        weights = _gather_blocks(layout, lambda flat: flat)
        # Decoded (int8 / bf16 momentum): the checkpoint is float32 whatever the storage.
        momenta = _gather_blocks(
            layout, lambda flat: lowp.decoded_momentum(sai.state.get(flat, {}), layout, flat)
        )
        gsnr, scale = block_values(sai)
        for b, p in enumerate(layout.block_params):
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            assert weights is not None
            entry = {"param": weights[b].reshape(shape)}
            if momenta is not None:
                entry["momentum"] = momenta[b].reshape(shape)
            if not torch.isnan(gsnr[b]):
                entry["gsnr"], entry["scale"] = float(gsnr[b]), float(scale[b])
            entries[_clean(layout.block_name(b))] = entry
    gsnr_max = sai.gsnr_max()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "params": entries,
        "gsnr_max": gsnr_max,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sai.param_groups],
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def _clean(name: str) -> str:
    from sai_dist.names import clean_name

    return clean_name(name)


@torch.no_grad()
def load_optimizer_state(engine: Any, path: str | os.PathLike, *, load_weights: bool = True) -> None:
    """Load a :func:`save_optimizer_state` checkpoint into ``engine``, whatever its world
    size and ZeRO stage: fp32 master weights (and the low-precision copies DeepSpeed
    trains with), momentum, g-SNR and scale, per original parameter by name.

    Every parameter the engine trains must be in the checkpoint (a ``KeyError`` names
    the missing ones). Param-group hyper-parameters (lr, ...) are left as configured.
    Every rank calls it.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a sai_dist DeepSpeed optimizer checkpoint ({payload.get('format')!r})"
        )
    entries: dict[str, dict[str, Any]] = payload["params"]
    gsnr_max = payload["gsnr_max"]
    sai, layout = _sai_and_layout(engine)
    names = _param_names(engine.module)
    max_t = None if gsnr_max is None else torch.tensor(gsnr_max, dtype=torch.float32)

    def entry_for(name: str) -> dict[str, Any]:
        key = _clean(name)
        if key not in entries:
            missing = sorted(set(_clean(n) for n in names.values()) - set(entries))
            raise KeyError(f"{path} has no entry for parameter(s) {missing[:10]}")
        return entries[key]

    if layout is None:
        for group in sai.param_groups:
            for p in group["params"]:
                e = entry_for(names[id(p)])
                if load_weights:
                    p.data.copy_(e["param"].reshape(p.shape))
                state = sai.state[p]
                if "momentum" in e:
                    # Encoded (rounding to nearest) into the optimizer's momentum_dtype.
                    loaded = {MOMENTUM: e["momentum"].reshape(p.shape).to(p.device, torch.float32).clone()}
                    lowp.restore_loaded(state, loaded, sai.layout, p, sai.momentum_dtype)
                if "gsnr" in e and max_t is not None:
                    state[GSNR] = torch.tensor(e["gsnr"], dtype=torch.float32)
                    state[SCALE] = torch.tensor(e["scale"], dtype=torch.float32)
                    state[GSNR_MAX] = max_t.clone()
        return

    blocks = [entry_for(layout.block_name(b)) for b in range(layout.num_blocks)]
    for flat in layout.flats:
        segs = layout.segments(flat)
        state = sai.state[flat]
        view = flat.data.reshape(-1)
        have_momentum = all("momentum" in blocks[s.block] for s in segs) and segs
        if have_momentum:
            buf = torch.zeros_like(flat.data)
            state[MOMENTUM] = buf
        for s in segs:
            e = blocks[s.block]
            n = s.stop - s.start
            if load_weights:
                view[s.start : s.stop].copy_(e["param"].reshape(-1)[s.offset : s.offset + n])
            if have_momentum:
                buf.reshape(-1)[s.start : s.stop].copy_(e["momentum"].reshape(-1)[s.offset : s.offset + n])
        if have_momentum:
            # Encoded (rounding to nearest) into the optimizer's momentum_dtype.
            lowp.restore_loaded(state, {MOMENTUM: buf}, layout, flat, sai.momentum_dtype)
        if max_t is not None and all("gsnr" in blocks[s.block] for s in segs):
            g = torch.tensor([blocks[s.block]["gsnr"] for s in segs], dtype=torch.float32)
            sc = torch.tensor([blocks[s.block]["scale"] for s in segs], dtype=torch.float32)
            state[GSNR] = g[0].clone() if len(segs) == 1 else g
            state[SCALE] = sc[0].clone() if len(segs) == 1 else sc
            state[GSNR_MAX] = max_t.clone()
    if load_weights:
        _push_master_weights(engine.optimizer)
    layout.table_cache = None
    if sai.initialized:
        block_values(sai, refresh=True)


def _push_master_weights(wrapper: Any) -> None:
    """Copy the fp32 master partitions into the weights the model computes with."""
    kind = _wrapper_kind(wrapper)
    if kind == "zero12" or kind == "bf16":
        wrapper.update_lp_params()
    elif kind == "zero3":
        for i in range(len(wrapper.fp32_partitioned_groups_flat)):
            wrapper._reassign_or_swap_out_partitioned_parameters(i)
    elif kind == "fp16":
        for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            for lp, hp in zip(lp_group, hp_group, strict=True):
                lp.data.copy_(hp.data)


if _ds is not None:
    install()


#: Where DeepSpeed's CPU communication op keeps each rank's all-reduce workspace.
SHM_DIR = "/dev/shm"


def shm_workspace_path(rank: int, env: dict[str, str] | None = None) -> str:
    """The POSIX shared-memory file DeepSpeed's CPU all-reduce op makes for ``rank``.

    ``ShareMemCommBuilder`` (built when ``deepspeed.comm`` starts on CPU) creates, when every
    rank is on one host, one segment per rank named
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (about 67 MB),
    keyed on the launch's rendezvous address, so two launches never share a name.
    """
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_workspace(rank: int) -> bool:
    """Unlink this rank's DeepSpeed shared-memory workspace; ``True`` if there was one.

    DeepSpeed never unlinks it, and ``/dev/shm`` is RAM: every multi-rank CPU run would leave
    ~67 MB per rank behind until reboot. Call it once this rank's last collective is done
    (after ``destroy_process_group``); peers that still hold the segment mapped keep it
    until they exit, and nothing opens it by name after start-up.
    """
    try:
        os.unlink(shm_workspace_path(rank))
    except FileNotFoundError:
        return False
    return True
