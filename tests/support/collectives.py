"""Count the collectives a block of code issues, at every layer torch offers one.

``CollectiveCounter`` is a context manager combining two nets, because neither alone
sees everything:

* wrappers around the Python entry points: ``torch.distributed``'s collectives (what
  ``dist.all_reduce`` and friends resolve to), the functional collectives DTensor's
  redistribution calls (``torch.distributed._functional_collectives``), DTensor's mesh
  helpers and its ``redistribute_local_tensor``. Collectives issued *inside* DTensor's op
  dispatch (a sharding-propagation redistribute) are only visible here: a dispatch mode
  is switched off while an op it intercepted runs.
* a ``TorchDispatchMode`` that sees every ``c10d``/``_c10d_functional``/``_dtensor`` op
  dispatched directly in the block (e.g. a library calling ``torch.ops.c10d.*``).

An outermost wrapper marks itself active, so the ops it issues underneath are not counted
twice. ``counts`` maps the entry point's name to how many times it was entered.
"""

from __future__ import annotations

import collections
import functools
import sys
from typing import Any

import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
import torch.distributed.tensor._collective_utils as dtensor_collectives
import torch.distributed.tensor._redistribute as dtensor_redistribute
from torch.utils._python_dispatch import TorchDispatchMode

_C10D = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_coalesced",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "all_to_all",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)
_FUNCOL = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather_tensor",
    "all_gather_tensor_autograd",
    "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor",
    "reduce_scatter_tensor_autograd",
    "reduce_scatter_tensor_coalesced",
    "all_to_all_single",
    "all_to_all_single_autograd",
    "broadcast",
    "permute_tensor",
)
_DTENSOR = ("mesh_broadcast", "mesh_scatter", "shard_dim_alltoall", "fill_empty_tensor_to_shards")
_OP_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_dtensor")
# Bookkeeping ops of the functional collectives, not communication.
_NOT_COMMUNICATION = ("wait_tensor", "_wrap_tensor_autograd")


class _OpCounter(TorchDispatchMode):
    def __init__(self, owner: CollectiveCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in _OP_NAMESPACES and not any(n in str(func) for n in _NOT_COMMUNICATION):
            if self.owner._depth == 0:
                self.owner.counts[f"op:{func}"] += 1
        return func(*args, **(kwargs or {}))


class CollectiveCounter:
    """``with CollectiveCounter() as c: ...``; then ``c.total`` and ``c.counts``."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._depth = 0
        self._saved: list[tuple[Any, str, Any]] = []
        self._mode = _OpCounter(self)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _wrap(self, module: Any, name: str, label: str) -> None:
        original = getattr(module, name, None)
        if original is None or not callable(original) or getattr(original, "_counting", False):
            return
        counter = self

        @functools.wraps(original)
        def counting(*args: Any, **kwargs: Any) -> Any:
            if counter._depth == 0:
                counter.counts[label] += 1
            counter._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth -= 1

        counting._counting = True  # type: ignore[attr-defined]
        # ``from x import f`` copies the binding: rebind it in every torch.distributed
        # module that holds this very function (DTensor's dispatcher does).
        for mod in list(sys.modules.values()):
            if not getattr(mod, "__name__", "").startswith("torch.distributed"):
                continue
            for attr, value in list(vars(mod).items()):
                if value is original:
                    self._saved.append((mod, attr, original))
                    setattr(mod, attr, counting)

    def __enter__(self) -> CollectiveCounter:
        for name in _C10D:
            self._wrap(c10d, name, f"dist.{name}")
        for name in _FUNCOL:
            self._wrap(funcol, name, f"funcol.{name}")
        for name in _DTENSOR:
            self._wrap(dtensor_collectives, name, f"dtensor.{name}")
        self._wrap(dtensor_redistribute, "redistribute_local_tensor", "dtensor.redistribute_local_tensor")
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()
