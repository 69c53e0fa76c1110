"""The g-SNR table's parameter names: a parameter as the user's unwrapped model spells it.

Every wrapper renames parameters (DDP's ``module.``, FSDP1's ``_fsdp_wrapped_module.``,
torch.compile's ``_orig_mod.`` ...); the table, the layouts that build its rows, the
DeepSpeed checkpoint and the integrations all name a parameter through this module, so one
model gets the same keys under every backend. Bottom layer: imports nothing of sai_dist.

**The one policy.** A name is read along the module tree it was taken from, segment by
segment, and a segment is dropped only where a wrapper put it:

- the attributes wrappers create for the module they wrap, never a user's name:
  ``_orig_mod`` (torch.compile), ``_fsdp_wrapped_module`` (FSDP1, fairscale FSDP),
  ``_fpw_module`` (fairscale's FlattenParamsWrapper), ``_checkpoint_wrapped_module``
  (activation checkpointing): always dropped;
- ``module``, which DDP, DataParallel, DeepSpeed's engine and fairscale's
  ShardedDataParallel use for the model they hold, and which a user may also give a
  submodule: dropped only below a *pure wrapper*, a module that has no parameter of its own
  and ``module`` as its only child. A user's ``module`` next to a parameter or another
  submodule of its parent is kept, so it can never collide with a sibling in the table. (A
  user's parent holding nothing but a child called ``module`` cannot be told from DDP by
  structure; its ``module`` goes, and with no sibling nothing can collide.)

A wrapper that flattens parameters (FSDP1 with ``use_orig_params=False``, fairscale FSDP
with ``flatten_parameters=True``) removes them from their modules' ``_parameters``, so
"has no parameter of its own" would misread the user's modules there: its layout passes
the modules its flat parameters say own parameters (``param_owners``).
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

__all__ = ["unwrapped_name", "unwrapped_path"]

# Attributes wrappers keep the wrapped module under; no user names a submodule so.
_WRAPPER_ATTRIBUTES = frozenset(
    ("_orig_mod", "_fsdp_wrapped_module", "_fpw_module", "_checkpoint_wrapped_module")
)
# The attribute of DDP, DataParallel, DeepSpeed's engine and fairscale's ShardedDataParallel:
# a wrapper's only where its owner is a pure wrapper.
_MODULE = "module"


def _kept(model: nn.Module, parts: list[str], param_owners: Collection[nn.Module]) -> list[str]:
    """The segments of the module path ``parts`` (from ``model``) that the user's model has."""
    kept: list[str] = []
    owner: nn.Module | None = model
    for part in parts:
        child = None if owner is None else owner._modules.get(part)
        if part in _WRAPPER_ATTRIBUTES:
            pass
        elif part == _MODULE and owner is not None and child is not None:
            pure_wrapper = (
                not owner._parameters and owner not in param_owners and list(owner._modules) == [_MODULE]
            )
            if not pure_wrapper:
                kept.append(part)
        else:
            kept.append(part)
        owner = child  # None past a segment that is no submodule: nothing more is dropped
    return kept


def unwrapped_path(model: nn.Module, path: str, *, param_owners: Collection[nn.Module] = ()) -> str:
    """The path of a submodule of ``model`` (``model.named_modules()`` spelling) as the
    user's unwrapped model spells it; ``""`` for ``model`` itself or a wrapper of it."""
    return ".".join(_kept(model, path.split(".") if path else [], param_owners))


def unwrapped_name(model: nn.Module, name: str, *, param_owners: Collection[nn.Module] = ()) -> str:
    """A parameter name of ``model`` (``model.named_parameters()`` spelling) as the user's
    unwrapped model spells it: the module path by :func:`unwrapped_path`, then the
    parameter's own name. ``param_owners``: modules known to own parameters that a
    flattening wrapper moved out of their ``_parameters`` (see the module docstring)."""
    *path, leaf = name.split(".")
    return ".".join([*_kept(model, path, param_owners), leaf])
