r"""SGD-SaI applied inside the backward pass: no whole gradient copy ever lives.

In the usual loop a full set of gradients exists between ``backward()`` and ``step()``, so
training holds parameters + gradients + one momentum buffer: three fp32 copies of the
model. Here every parameter is updated by a post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``) the moment its gradient is final, and the
gradient is dropped at once, so only one block's gradient exists at a time:

.. math::
    \text{peak} \approx |\theta| + |m| + \max_b |g_b| \quad\text{instead of}\quad
    |\theta| + |m| + |g|.

**Step 1 and exact g-SNR.** SGD-SaI's scales need the g-SNR of *every* block, normalised
by the largest, before the first update. We keep the gradients during the first backward
only, then, in a callback queued on the autograd engine that runs when that backward ends,
fix g-SNR over all blocks with the optimizer's own ``_fix_gsnr`` (the same statistics
engine and normaliser as the normal step) and step the blocks one by one, dropping each
gradient right after its momentum buffer (a clone of it) is born. At no moment do a
block's gradient and its buffer both exist except for the block being stepped, so step
1's peak is parameters + one full copy + one block: the same bound as every later step,
with no extra forward/backward. (A stats-only first backward, recording per-block moments
and discarding gradients, would need a second backward of the same batch to produce the
first update; keeping the step-1 gradients costs nothing extra because they *become* the
momentum buffers.) With ``momentum=0`` there is no buffer: step 1 holds the gradients
until g-SNR is fixed (one copy, as the normal mode), later steps only one block.

**Same trajectory.** The update of each tensor is :meth:`SGDSaI._step_group` on that
tensor alone, the very code ``SGDSaI.step`` runs per group, so on CPU (the per-tensor
implementation) the parameters are bitwise those of the normal mode, and within
floating-point reassociation elsewhere.

**Contract.** Single process only (the replicated layout): under DDP or FSDP the hook sees
the local, not yet reduced gradient, so this raises if a multi-rank process group is
initialised. One optimizer step per ``backward()``: no gradient accumulation, and
``loss.backward()`` is the whole step (there is nothing to call afterwards). Parameters
are updated in place while backward runs; as for ``torch``'s own optimizer-in-backward,
a model must not save a parameter's detached alias for a later backward node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sai_dist.layouts import ReplicatedLayout
from sai_dist.optimizer import SCALE, SGDSaI

__all__ = ["InBackwardSGDSaI"]


class InBackwardSGDSaI:
    """Train with SGD-SaI updates applied during ``backward()``.

    Args:
        params: parameters (or ``(name, param)`` pairs, or param-group dicts), as for
            :class:`~sai_dist.SGDSaI`.
        **kwargs: every other argument of :class:`~sai_dist.SGDSaI` (``lr``,
            ``momentum``, ``weight_decay``, ``eps``, ``normalize``, ``degenerate``, ...).

    The wrapped optimizer is :attr:`optimizer` (its ``state_dict``, ``param_groups`` and
    g-SNR table are the usual ones; :func:`sai_dist.gsnr_table` finds it). Call
    :meth:`remove` to detach the hooks.
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "InBackwardSGDSaI is single-process only: under DDP/FSDP a post-accumulate-grad hook sees "
                "the local gradient before it is reduced across ranks. Use SGDSaI with the wrapper instead."
            )
        self.optimizer = SGDSaI(params, **kwargs)
        if not isinstance(self.optimizer.layout, ReplicatedLayout):
            raise RuntimeError(
                "InBackwardSGDSaI needs whole (unsharded) parameters; got "
                f"{type(self.optimizer.layout).__name__}"
            )
        self._group_of: dict[int, dict[str, Any]] = {}
        self._handles = []
        self._first_pending: list[Tensor] = []
        self._callback_queued = False
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if id(p) in self._group_of:
                    raise ValueError(f"parameter of shape {tuple(p.shape)} appears twice")
                self._group_of[id(p)] = group
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    # -- hooks ---------------------------------------------------------------------

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if p.grad is None:
            return
        if p.grad.is_sparse:
            raise RuntimeError(f"SGDSaI does not support sparse gradients (tensor of shape {tuple(p.shape)})")
        if not self.optimizer.initialized:
            # Step 1: g-SNR needs every block; keep this gradient until the backward ends.
            self._first_pending.append(p)
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish_first_step)
            return
        self._step_one(p)

    @torch.no_grad()
    def _step_one(self, p: Tensor) -> None:
        opt = self.optimizer
        state = opt.state[p]
        if SCALE not in state:
            # A block whose first gradient comes after step 1: scaled by the fixed max, as in step().
            opt._fix_gsnr([p], opt._gsnr_max())
        opt._step_group(self._group_of[id(p)], [p])
        p.grad = None

    @torch.no_grad()
    def _finish_first_step(self) -> None:
        pending, self._first_pending = self._first_pending, []
        self._callback_queued = False
        opt = self.optimizer
        pending = [p for p in pending if p.grad is not None]
        if not opt._fix_gsnr(pending, None):
            for p in pending:  # an all-zero probe step: nothing is fixed, nothing kept
                p.grad = None
            return
        for p in pending:
            opt._step_group(self._group_of[id(p)], [p])
            p.grad = None

    # -- conveniences --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def remove(self) -> None:
        """Detach every hook; the parameters then train no more through this object."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
