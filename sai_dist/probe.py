r"""State-template probes: the zero-gradient, lr-0 step clients take to make state exist.

DCP's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` and torchtitan's
``OptimizersContainer`` (``init_optim_state``, before every ``state_dict()`` and
``load_state_dict()``) need an optimizer's state tensors to exist before anything is
saved or loaded: they are the template a checkpoint is read into. When there is no state
yet they create it with one ``step()`` on all-zero gradients with every group's ``lr`` set
to 0, then restore ``lr`` and drop the gradients.

SGD-SaI must not fix g-SNR from such a step (a zero gradient has no signal), so without
help the probe leaves no state and every such client silently loads none. Instead, a
step whose gradients are all exactly zero *and* whose groups all have ``lr == 0`` is
taken as a probe, and every tensor with a gradient gets *placeholders* with the shapes the
real state will have:

* ``momentum_buffer``: ``zeros_like(p)`` in groups with momentum (a DTensor keeps its mesh
  and placements, so DCP reshards a checkpoint into it);
* ``gsnr``, ``scale``, ``gsnr_max``: CPU float32 NaN, 0-d (or one value per piece for a
  tensor holding several blocks).

A NaN ``gsnr_max`` means "not fixed": placeholders are dropped at the next step that fixes
g-SNR (so momentum starts as the first gradient, as in a run that was never probed) and
right after ``load_state_dict`` (where the checkpoint's real values have replaced them,
or the checkpoint itself was saved before step 1). A checkpoint written before step 1
therefore holds placeholders and loads as a fresh optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from sai_dist.state_keys import GSNR_MAX, MOMENTUM, MOMENTUM_SCALE, MOMENTUM_SMALL, ROUNDING_STEP, SCALARS

__all__ = ["drop_placeholders", "is_placeholder", "is_probe", "placeholder_state"]


def is_probe(groups: Iterable[Mapping[str, Any]]) -> bool:
    """Whether every param group has ``lr == 0`` (the caller has already found every
    gradient to be zero): a state-template probe, not a training step."""
    lrs = [group["lr"] for group in groups]
    return bool(lrs) and all(float(lr) == 0.0 for lr in lrs)


def placeholder_state(
    param: Tensor,
    num_pieces: int,
    momentum: float,
    stored: torch.dtype | None = None,
    num_scales: int | None = None,
    rounding: bool = False,
    small_numel: int | None = None,
) -> dict[str, Tensor]:
    """The placeholders for ``param`` (see the module doc), in the storage the real state
    will have (:mod:`sai_dist.momentum`): the buffer in ``stored`` (default: the
    parameter's dtype), ``num_scales`` float32 block scales for int8 codes, and the
    stochastic-rounding step counter where ``rounding``, ``small_numel`` float32 elements
    of a flat tensor's small pieces beside int8 codes, so a checkpoint of low-precision
    state loads into the template as it was saved, never cast."""
    shape: tuple[int, ...] = () if num_pieces == 1 else (num_pieces,)
    entry = {k: torch.full(shape, math.nan, dtype=torch.float32) for k in SCALARS}
    if momentum != 0:
        entry[MOMENTUM] = torch.zeros_like(
            param, dtype=stored or param.dtype, memory_format=torch.contiguous_format
        ).detach()
        if num_scales is not None:
            entry[MOMENTUM_SCALE] = torch.zeros(num_scales, dtype=torch.float32)
        if small_numel is not None:
            entry[MOMENTUM_SMALL] = torch.zeros(small_numel, dtype=torch.float32)
    if rounding:
        entry[ROUNDING_STEP] = torch.zeros((), dtype=torch.int64)
    return entry


def is_placeholder(entry: Mapping[str, Any]) -> bool:
    """Whether a state entry is a probe's placeholder (its ``gsnr_max`` is NaN)."""
    value = entry.get(GSNR_MAX)
    return value is not None and bool(torch.as_tensor(value).isnan().all())


def drop_placeholders(state: dict[Any, dict[str, Any]]) -> None:
    """Remove every placeholder entry from an optimizer's ``state`` in place."""
    for key in [k for k, entry in state.items() if is_placeholder(entry)]:
        del state[key]
