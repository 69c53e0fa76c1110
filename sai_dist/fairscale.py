"""fairscale integration: ``OSS(params, optim=SGDSaI, ...)`` with the global g-SNR max.

fairscale's ``OSS`` builds its inner optimizer itself, ``optim(partition, **defaults)``,
from this rank's partition only, so an ``SGDSaI`` built that way cannot know the other
ranks' blocks and would normalise by the max of its own. Importing this module once,
before the OSS is built, hooks ``OSS.refresh_trainable`` (where OSS constructs its inner
optimizer) so that an inner :class:`~sai_dist.SGDSaI` gets an
:class:`~sai_dist.layouts.oss.OSSLayout` over every parameter of the OSS::

    import sai_dist.fairscale  # once, before building OSS
    from fairscale.optim import OSS
    from fairscale.nn import ShardedDataParallel  # optional

    optimizer = OSS(model.parameters(), optim=sai_dist.SGDSaI, lr=1e-2)
    model = ShardedDataParallel(model, optimizer)  # or DDP, or all-reduce grads yourself
    ...
    sai_dist.gsnr_table(model, optimizer)  # collective: every rank calls it

:func:`attach` does the same for an OSS built before the import. The hook also keeps the
g-SNR scalars CPU float32 when ``OSS.load_state_dict`` copies loaded state onto the
parameters' device.

For fairscale's ``FullyShardedDataParallel`` use
``SGDSaI(model.parameters(), layout=sai_dist.layouts.flat_param_layout(model))``.

Supported: fairscale 0.4.13 with torch 2.13 (built with ``--no-build-isolation``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from sai_dist.layouts.oss import OSSLayout
from sai_dist.optimizer import SGDSaI
from sai_dist.state_keys import GSNR, GSNR_MAX, SCALE

try:
    from fairscale.optim import OSS as _OSS
except ImportError:  # pragma: no cover - exercised on machines without fairscale
    _OSS = None

__all__ = ["attach", "install"]

_INSTALLED = False


def attach(oss: Any) -> SGDSaI:
    """Give the :class:`SGDSaI` inside ``oss`` (a ``fairscale.optim.OSS``) the layout over
    all of OSS's parameters. Idempotent; must happen before the first step, on every rank.

    Raises ``TypeError`` if OSS's inner optimizer is not an SGDSaI and
    :class:`~sai_dist.layouts.LayoutError` if some rank owns no parameter at all: such a
    rank would never hold g-SNR state, so it could not tell that step 1 had happened.
    """
    sai = oss.optim
    if not isinstance(sai, SGDSaI):
        raise TypeError(f"OSS's inner optimizer is {type(sai).__name__}, not SGDSaI")
    if isinstance(sai.layout, OSSLayout) and sai.layout.oss is oss:
        return sai
    from sai_dist.layouts.base import LayoutError

    empty = [r for r, groups in enumerate(oss.partition_parameters()) if not any(g["params"] for g in groups)]
    if empty:
        raise LayoutError(
            f"SGDSaI under OSS: rank(s) {empty} of {oss.world_size} own no parameter (the model has fewer "
            "parameters than OSS has ranks); use DDP instead, or fewer ranks."
        )
    sai.use_layout(OSSLayout(oss))
    return sai


def _scalars_to_cpu(sai: SGDSaI) -> None:
    # OSS.load_state_dict writes the inner state directly, moved to each parameter's
    # device; SGDSaI keeps its g-SNR scalars on the CPU in float32.
    for state in sai.state.values():
        for key in (GSNR, SCALE, GSNR_MAX):
            if key in state:
                state[key] = torch.as_tensor(state[key]).detach().to("cpu", torch.float32)


def install() -> None:
    """Hook fairscale's OSS so that an inner SGDSaI gets its layout when OSS builds it.
    Runs on import of this module; idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    if _OSS is None:
        raise ImportError(
            "sai_dist.fairscale needs fairscale: pip install --no-build-isolation fairscale==0.4.13"
        )

    refresh = _OSS.refresh_trainable

    @functools.wraps(refresh)
    def refresh_trainable(self: Any) -> None:
        refresh(self)
        if isinstance(self.optim, SGDSaI) and not self.optim.initialized:
            attach(self)

    load = _OSS.load_state_dict

    @functools.wraps(load)
    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        load(self, state_dict)
        if isinstance(self.optim, SGDSaI):
            _scalars_to_cpu(self.optim)

    _OSS.refresh_trainable = refresh_trainable
    _OSS.load_state_dict = load_state_dict
    _INSTALLED = True


if _OSS is not None:
    install()
