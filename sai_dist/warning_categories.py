"""The warnings sai_dist emits, one category each, so callers (and sai_dist itself) filter
them by category instead of by message text.

All derive from :class:`SGDSaIWarning`, a ``UserWarning``: a filter on ``UserWarning`` still
covers them. Bottom layer: imports nothing of sai_dist.
"""

from __future__ import annotations

__all__ = ["DegenerateGradientWarning", "SGDSaIWarning", "StateWithoutGsnrWarning", "ZeroGradientStepWarning"]


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
