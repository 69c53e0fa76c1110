"""Which sharding wrapper drives an :class:`~sai_dist.SGDSaI` whose integration was not imported.

fairscale's ``OSS`` and DeepSpeed's ZeRO build or rebind the optimizer's param groups
themselves (OSS: this rank's partition of the parameters; ZeRO: flat fp32 partitions).
``import sai_dist.fairscale`` / ``import sai_dist.deepspeed`` hooks them so that SGD-SaI
gets a layout mapping those tensors onto the model's blocks. Without the import the
optimizer keeps its automatic layout and the failure shows up far from its cause: a
:class:`~sai_dist.consistency.RankMismatchError` (OSS partitions differ by rank), a
:class:`~sai_dist.layouts.LayoutError` about tensors it was never given (ZeRO), or, for an
OSS whose partitions happen to look alike, a silently wrong normaliser (each rank's max
over its own partition).

The wrapper is recognised from the call stack: its module is the one calling
``SGDSaI.step`` (or building the optimizer). That is a diagnostic only; nothing here
changes what the optimizer does. Only the integrations themselves know the wrappers'
internals.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = ["Wrapper", "calling_wrapper"]


@dataclass(frozen=True)
class Wrapper:
    """A wrapper that needs an integration import."""

    module_prefix: str  # the wrapper's modules: ``__name__`` of a frame on the stack
    name: str
    fix: str
    #: Whether an automatic layout under it is always wrong at more than one rank (OSS
    #: normalises by the max of each rank's own partition), rather than failing by itself.
    refuse: bool


WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper(
        "fairscale.optim.oss",
        "fairscale's OSS",
        "`import sai_dist.fairscale` before building the OSS (or call sai_dist.fairscale.attach(oss) "
        "before the first step)",
        refuse=True,
    ),
    Wrapper(
        "deepspeed.",
        "DeepSpeed",
        "`import sai_dist.deepspeed` before deepspeed.initialize (Trainer, Lightning and accelerate call "
        "it for you), or use sai_dist.deepspeed.initialize",
        refuse=False,
    ),
)


def calling_wrapper(depth: int = 64) -> Wrapper | None:
    """The wrapper of :data:`WRAPPERS` with a frame on the current call stack (the innermost
    one), or ``None``. Looks at most ``depth`` frames up."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        module = frame.f_globals.get("__name__", "")
        for wrapper in WRAPPERS:
            if module.startswith(wrapper.module_prefix):
                return wrapper
        frame = frame.f_back
    return None


def missing_integration_message(wrapper: Wrapper) -> str:
    """The sentence that names the missing integration import as the fix."""
    return (
        f"SGDSaI is stepped by {wrapper.name} without its sai_dist integration, so it cannot map the "
        f"tensors {wrapper.name} gives it onto the model's blocks (g-SNR and its normaliser would be "
        f"those of this rank's partition, not of the model). Fix: {wrapper.fix}."
    )
