"""Keys of SGD-SaI's per-tensor optimizer state.

A concept the optimizer, the layouts, the integrations and checkpoints all share, so it
lives below every one of them: ``layouts/flat_segment.py`` reads the g-SNR scalars of a state
dict without importing :mod:`sai_dist.optimizer` (which imports the layouts).

- ``MOMENTUM``: the momentum buffer, same shape and placement as the parameter. Its dtype
  is the storage tag (:mod:`sai_dist.momentum`): float32, bfloat16, or int8 codes.
- ``MOMENTUM_SCALE``: int8 momentum only, one float32 scale per quantization block.
- ``MOMENTUM_SMALL``: int8 momentum of a flat tensor (ZeRO partition, FSDP1 shard) only:
  the float32 momentum of its pieces of parameters under ``sai_dist.momentum.SMALL``
  elements, end to end in piece order (``sai_dist.momentum.PieceStorage``).
- ``ROUNDING_STEP``: updates the tensor has had, a key of the stochastic-rounding
  generator; present only when the tensor uses stochastic rounding.
- ``GSNR``, ``SCALE``, ``GSNR_MAX`` (``SCALARS``): CPU float32 g-SNR scalars (one value per
  piece for tensors holding several blocks). The presence of a finite ``gsnr_max`` marks
  g-SNR as fixed; a NaN one marks a state-template placeholder (see :mod:`sai_dist.probe`).
"""

from __future__ import annotations

MOMENTUM = "momentum_buffer"
MOMENTUM_SCALE = "momentum_scale"
MOMENTUM_SMALL = "momentum_small"
ROUNDING_STEP = "rounding_step"
GSNR = "gsnr"
SCALE = "scale"
GSNR_MAX = "gsnr_max"
SCALARS = (GSNR, SCALE, GSNR_MAX)

__all__ = [
    "GSNR",
    "GSNR_MAX",
    "MOMENTUM",
    "MOMENTUM_SCALE",
    "MOMENTUM_SMALL",
    "ROUNDING_STEP",
    "SCALARS",
    "SCALE",
]
