"""The g-SNR table's parameter names: a parameter as the unwrapped model spells it.

Every wrapper renames parameters (DDP's ``module.``, FSDP1's ``_fsdp_wrapped_module.``,
torch.compile's ``_orig_mod.`` ...); the table, the layouts that build its rows and the
integrations all name a parameter through this module, so one model gets the same keys
under every backend. Bottom layer: imports nothing of sai_dist.
"""

from __future__ import annotations

from torch import nn

__all__ = ["clean_name", "unwrapped_name"]

# Prefixes wrappers insert into parameter names: DDP and DeepSpeed (module.), torch.compile
# (_orig_mod.), FSDP1 and fairscale FSDP (_fsdp_wrapped_module., fairscale's
# FlattenParamsWrapper _fpw_module.) and activation checkpointing wrappers.
_WRAPPER_SEGMENTS = (
    "module",
    "_orig_mod",
    "_fsdp_wrapped_module",
    "_fpw_module",
    "_checkpoint_wrapped_module",
)


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model spells it."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def unwrapped_name(model: nn.Module, name: str) -> str:
    """``clean_name`` that drops a ``module`` segment only where a pure wrapper put it: a
    module with no parameters of its own whose only child is ``module`` (DDP, DeepSpeed's
    engine). A user's own submodule that happens to be called ``module`` keeps its name, so
    it cannot collide with a sibling parameter in the table."""
    parts = name.split(".")
    kept: list[str] = []
    owner = model
    for part in parts[:-1]:
        pure_wrapper = not owner._parameters and list(owner._modules) == [part]
        if part not in _WRAPPER_SEGMENTS or (part == "module" and not pure_wrapper):
            kept.append(part)
        owner = getattr(owner, part)
    return ".".join([*kept, parts[-1]])
