"""Keys of :class:`~sai_dist.SGDSaI`'s per-tensor optimizer state, shared by the optimizer,
its checkpoint helpers, the g-SNR table and the integrations.

Besides the momentum buffer every entry is a CPU float32 scalar (or one value per piece
for tensors holding several blocks). The presence of a finite ``gsnr_max`` marks g-SNR as
fixed; a NaN one marks a state-template placeholder (see :mod:`sai_dist.probe`).
"""

MOMENTUM = "momentum_buffer"
GSNR = "gsnr"
SCALE = "scale"
GSNR_MAX = "gsnr_max"
SCALARS = (GSNR, SCALE, GSNR_MAX)

__all__ = ["GSNR", "GSNR_MAX", "MOMENTUM", "SCALARS", "SCALE"]
