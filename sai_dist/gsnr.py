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
class GSNR:
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


def block_gsnr(moments: BlockMoments, eps: Tensor | float, policy: DegeneratePolicy) -> GSNR:
    """g-SNR of every block from its moments.

    Args:
        moments: reduced moments, see :func:`sai_dist.stats.reduce_block_moments`.
        eps: scalar or per-block ``[num_blocks]`` epsilon (param groups may differ).
        policy: ``"max"`` or ``"official"``, see the module docstring.
    """
    std = moments.std.nan_to_num(0.0)
    raw = moments.norm / (std + eps)
    present = moments.count > 0
    degenerate = present & (std == 0)
    if policy == "official":
        return GSNR(raw=raw, value=raw.clone(), degenerate=degenerate, present=present)
    regular = present & ~degenerate
    fill = raw[regular].max() if bool(regular.any()) else torch.tensor(1.0, dtype=raw.dtype)
    value = torch.where(degenerate, fill, raw)
    return GSNR(raw=raw, value=value, degenerate=degenerate, present=present)


def normaliser(gsnr: GSNR, normalize: bool) -> float:
    """The divisor fixed at step 1: the largest g-SNR of the model, or 1 without
    normalisation. Blocks whose g-SNR is 0 everywhere give a max of 0; then scales are 0
    (the official code divides by zero there)."""
    if not normalize:
        return 1.0
    values = gsnr.value[gsnr.present]
    if values.numel() == 0:
        return 1.0
    top = float(values.max())
    return top if top > 0 else 1.0
