"""torchtitan integration: name ``"SGDSaI"`` in an ``OptimizersContainer`` config.

torchtitan's ``OptimizersContainer`` builds its optimizers from a config that names them
(``ParamGroupConfig.optimizer_name``) and resolves the name from a fixed table (``Adam``,
``AdamW``, ``DistMuon``). Importing this module once, before the container is built (in
your training script or the module that defines your config), adds ``"SGDSaI"`` to that
table, and that is the whole change from an AdamW setup::

    import sai_dist.torchtitan  # registers "SGDSaI"

    optimizer = sai_dist.torchtitan.sgdsai_config(lr=1e-2, weight_decay=1e-2)
    # or, spelled out, as for any optimizer:
    optimizer = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="SGDSaI",
                                       optimizer_kwargs={"lr": 1e-2, "momentum": 0.9})]
    )

The container puts every param group naming SGDSaI into one :class:`~sai_dist.SGDSaI`
per model part, so the g-SNR normaliser is the max over all its parameters; built after
``fully_shard`` (as torchtitan does), they are DTensors and the automatic layout reduces
g-SNR over the mesh. torchtitan's implementation switch (``implementation="fused"``, its
default, documented as CUDA only) maps to SGD-SaI's ``fused=None``: the single-pass
kernel wherever it exists (CUDA, CPU float32 with a C compiler), foreach or the loop
elsewhere; ``"foreach"`` and ``"for-loop"`` map to ``fused=False``.

Checkpoints: the container's ``state_dict()``/``load_state_dict()`` first run
``init_optim_state``, a zero-gradient, lr-0 probe step, to build the template DCP loads
into. SGD-SaI answers that probe with placeholders of its state's shapes
(:mod:`sai_dist.probe`), so torchtitan's own checkpointing (``CheckpointManager``, or
``dcp.save``/``dcp.load`` of the container) saves and restores the momentum and the fixed
g-SNR, and a resumed run continues bit-identically.

Limits: with pipeline parallelism each stage's model part gets its own SGDSaI, whose
normaliser is the max over that stage's parameters only; param groups naming another
optimizer are not part of SGD-SaI's normaliser.

Supported: torchtitan 0.3.0 with torch 2.13.
"""

from __future__ import annotations

import functools
from typing import Any

from sai_dist.optimizer import SGDSaI

__all__ = ["OPTIMIZER_NAME", "build_sgdsai", "install", "sgdsai_config"]

OPTIMIZER_NAME = "SGDSaI"
_INSTALLED = False


def build_sgdsai(param_groups: list[dict[str, Any]], **kwargs: Any) -> SGDSaI:
    """The factory torchtitan calls as ``factory(param_groups, **factory_kwargs)``.

    ``param_groups`` carry torchtitan's ``param_names`` (block names in warnings) and its
    implementation switches, translated as in the module doc; ``kwargs`` are
    ``optimizer_factory_kwargs_by_name["SGDSaI"]`` (optimizer-wide options such as
    ``normalize`` or ``degenerate``)."""
    groups = []
    for group in param_groups:
        group = dict(group)
        fused, foreach = group.pop("fused", None), group.pop("foreach", None)
        if fused is True:
            group["fused"] = None  # use it where it exists: torchtitan's "fused" is a preference
        elif fused is False:
            group["fused"] = False
            group["foreach"] = None if foreach is None else bool(foreach)
        groups.append(group)
    return SGDSaI(groups, **kwargs)


def sgdsai_config(lr: float = 1e-2, **kwargs: Any) -> Any:
    """An ``OptimizersContainer.Config`` with one catch-all SGDSaI param group (the
    counterpart of torchtitan's ``default_adamw``); ``kwargs`` are SGDSaI's group
    hyperparameters (``momentum``, ``weight_decay``, ``eps``)."""
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    install()
    return OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r".*", optimizer_name=OPTIMIZER_NAME, optimizer_kwargs={"lr": lr, **kwargs}
            )
        ]
    )


def install() -> None:
    """Teach ``OptimizersContainer`` the name ``"SGDSaI"``; runs on import, idempotent.
    Every other name resolves as before."""
    global _INSTALLED
    if _INSTALLED:
        return
    try:
        from torchtitan.components.optimizer import OptimizersContainer
    except ImportError as e:  # pragma: no cover - machines without torchtitan
        raise ImportError("sai_dist.torchtitan needs torchtitan (pip install torchtitan==0.3.0)") from e

    resolve = OptimizersContainer._resolve_optimizer_factory

    @functools.wraps(resolve)
    def _resolve_optimizer_factory(name: str) -> Any:
        if name == OPTIMIZER_NAME:
            return build_sgdsai
        return resolve(name)

    OptimizersContainer._resolve_optimizer_factory = staticmethod(_resolve_optimizer_factory)
    _INSTALLED = True


install()
