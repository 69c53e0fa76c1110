"""The hooks that make SGD-SaI work inside a DeepSpeed engine (see :mod:`sai_dist.deepspeed`):
``install`` (registration, on import), ``attach`` (the layout, for the wrapper DeepSpeed
built), ``initialize`` (``deepspeed.initialize`` with the switches SGD-SaI needs)."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from sai_dist.deepspeed.config import OPTIMIZER_TYPE, check_config_params, load_config, offloads_optimizer
from sai_dist.deepspeed.first_step import install_first_step_barrier
from sai_dist.layouts.zero import (
    FlatSegmentLayout,
    from_bf16_optimizer,
    from_fp16_unfused,
    from_zero3,
    from_zero12,
)
from sai_dist.names import unwrapped_name
from sai_dist.optimizer import SGDSaI
from sai_dist.table import block_values
from sai_dist.warning_categories import ZeroGradientStepWarning

try:
    import deepspeed as _ds
except ImportError:  # pragma: no cover - exercised on machines without DeepSpeed
    _ds = None

__all__ = ["attach", "deepspeed_available", "initialize", "install", "param_names", "wrapper_kind"]

_ATTACHED = "_sai_dist_attached"
_INSTALLED = False


def deepspeed_available() -> bool:
    """Whether the ``deepspeed`` package imported."""
    return _ds is not None


def _require_deepspeed() -> Any:
    if _ds is None:
        raise ImportError("sai_dist.deepspeed needs DeepSpeed: pip install 'sai_dist[deepspeed]'")
    return _ds


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


def param_names(module: torch.nn.Module) -> dict[int, str]:
    """Each parameter's name as the user's model spells it (:mod:`sai_dist.names`): the
    engine's ``module`` is the model DeepSpeed was given, so only wrappers the user put
    around it themselves (torch.compile's ``_orig_mod``, say) are read away."""
    return {id(p): unwrapped_name(module, name) for name, p in module.named_parameters()}


def wrapper_kind(wrapper: Any) -> str:
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
    kind = wrapper_kind(wrapper)
    _check_supported(wrapper, kind)
    names = param_names(engine.module)
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
        install_first_step_barrier(wrapper, sai, kind)
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


# -- initialize ------------------------------------------------------------------------


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
    cfg, args = load_config(config, args)
    if cfg is not None:
        section = cfg.get("optimizer")
        named = isinstance(section, dict) and str(section.get("type", "")).lower() == OPTIMIZER_TYPE.lower()
        if named:
            section["type"] = OPTIMIZER_TYPE
            check_config_params(section.get("params"))
        if named or isinstance(optimizer, SGDSaI):
            cfg.setdefault("zero_allow_untested_optimizer", True)
            if isinstance(optimizer, SGDSaI) and offloads_optimizer(cfg):
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
