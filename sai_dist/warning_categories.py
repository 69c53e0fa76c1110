"""The warnings sai_dist emits, one category each, so callers (and sai_dist itself) filter
them by category instead of by message text.

All derive from :class:`SGDSaIWarning`, a ``UserWarning``: a filter on ``UserWarning`` still
covers them. :func:`warn` emits one attributed to the user's line. Bottom layer: imports
nothing of sai_dist.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = [
    "DegenerateGradientWarning",
    "SGDSaIWarning",
    "StateWithoutGsnrWarning",
    "ZeroGradientStepWarning",
    "warn",
]


class SGDSaIWarning(UserWarning):
    """Base of every warning sai_dist emits."""


class ZeroGradientStepWarning(SGDSaIWarning):
    """Every gradient was zero at the first step: the step was skipped without fixing
    g-SNR (a state-template probe, or ``step()`` before ``backward()``)."""


class DegenerateGradientWarning(SGDSaIWarning):
    """A tensor's gradient had zero spread at the g-SNR step (one element, all zeros or a
    constant), so it got the policy's g-SNR instead of a measured one."""


class StateWithoutGsnrWarning(SGDSaIWarning):
    """``load_state_dict`` got optimizer state without g-SNR: it was not written by SGDSaI,
    and the next step fixes g-SNR from a fresh gradient."""


# Frames in these directories are library code; a warning is attributed to the first frame
# outside them (the user's ``opt.step()`` line). A fixed stacklevel cannot do this: torch
# wraps ``step`` in no_grad and profiling/hook wrappers, and integrations call it for users.
_LIBRARY_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def warn(message: str, category: type[SGDSaIWarning]) -> None:
    """``warnings.warn`` of ``category`` attributed to the caller outside sai_dist and torch."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
