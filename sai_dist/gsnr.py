r"""Gradient signal-to-noise ratio and the learning-rate scales SGD-SaI fixes at step 1.

For a block with gradient :math:`g` of :math:`N` elements (arXiv 2412.11768, Alg. 1):

.. math::
    \mathrm{gsnr} = \frac{\lVert g\rVert_2}{\operatorname{std}(g) + \epsilon},\qquad
    \operatorname{std}(g) = \sqrt{\tfrac{1}{N-1}\textstyle\sum (g_i - \bar g)^2}

with a NaN std (``N == 1``) read as 0, as ``torch.std().nan_to_num()`` gives. The scale is
``gsnr / max_b gsnr_b`` over every block of the model when ``normalize`` (official code
v1.0.4), else ``gsnr`` itself (v1.0.3, the PyPI release).

Degenerate blocks, whose gradient has zero spread (one element, all zeros, or a constant),
carry no noise estimate: the official formula gives ``||g|| / eps``, which for a single
element dwarfs every other block and, once normalised, freezes the rest of the model, and
gives 0 for an all-zero gradient, which freezes that block forever. Two policies:

``"max"`` (default)
    A degenerate block takes the largest g-SNR among the regular blocks (scale 1 when
    normalised), and is left out of that max. It trains like plain SGD with momentum at the
    group's lr: neither frozen nor dominating. A warning names it. If every block is
    degenerate, each gets g-SNR 1.
``"official"``
    The official formula unchanged, degenerate blocks included in the max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sai_dist.stats import BlockMoments

DegeneratePolicy = Literal["max", "official"]
DEGENERATE_POLICIES: tuple[str, ...] = ("max", "official")


@dataclass
class BlockGsnr:
    """g-SNR of a set of blocks (float64 tensors of shape ``[num_blocks]``).

    Attributes:
        raw: the official formula ``||g|| / (nan_to_num(std) + eps)``.
        value: g-SNR after the degenerate-block policy; what the scale is built from.
        degenerate: blocks whose gradient has zero spread.
        present: blocks that had any element.
    """

    raw: Tensor
    value: Tensor
    degenerate: Tensor
    present: Tensor


def block_gsnr(
    moments: BlockMoments, eps: Tensor | float, policy: DegeneratePolicy, fill: float | None = None
) -> BlockGsnr:
    """g-SNR of every block from its moments.

    Args:
        moments: reduced moments, see :func:`sai_dist.stats.reduce_block_moments`.
        eps: scalar or per-block ``[num_blocks]`` epsilon (param groups may differ).
        policy: ``"max"`` or ``"official"``, see the module docstring.
        fill: g-SNR given to degenerate blocks under ``"max"``; ``None`` (step 1) takes
            the largest regular g-SNR among these blocks. Blocks arriving after step 1
            pass the model's max fixed then.
    """
    std = moments.std.nan_to_num(0.0)
    raw = moments.norm / (std + eps)
    present = moments.count > 0
    degenerate = present & (std == 0)
    if policy == "official":
        return BlockGsnr(raw=raw, value=raw.clone(), degenerate=degenerate, present=present)
    if fill is None:
        regular = present & ~degenerate
        fill = float(raw[regular].max()) if bool(regular.any()) else 1.0
    value = torch.where(degenerate, torch.tensor(fill, dtype=raw.dtype), raw)
    return BlockGsnr(raw=raw, value=value, degenerate=degenerate, present=present)


def max_gsnr(gsnr: BlockGsnr) -> float:
    """The largest g-SNR among the blocks present (0 when there are none)."""
    values = gsnr.value[gsnr.present]
    return float(values.max()) if values.numel() else 0.0


def normaliser(gsnr_max: float, normalize: bool) -> float:
    """The divisor of every scale: the model's largest g-SNR, or 1 without normalisation.
    A largest g-SNR of 0 (every block all-zero under the official policy) gives 1, so the
    scales are 0 instead of the official code's division by zero."""
    if not normalize or gsnr_max <= 0:
        return 1.0
    return gsnr_max
