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
by the largest, before the first update. Two modes, chosen by ``first_step``:

``"keep"`` (default)
    The gradients are kept during the first backward only; a callback queued on the
    autograd engine, which runs when that backward ends, fixes g-SNR over all blocks with
    the optimizer's own ``fix_gsnr`` (the same statistics engine and normaliser as the
    normal step) and steps the blocks one by one, dropping each gradient right after its
    momentum buffer is born. With fp32 momentum the kept gradients *become* the buffers,
    so step 1 costs no extra pass. But they are one whole gradient copy alive at once: at
    7B in bf16, 12.55 GiB that no later step needs (and with ``momentum=0``, or a momentum
    buffer smaller than the gradient, nothing offsets it).
``"two_pass"``
    Step 1 runs the batch twice, through :meth:`InBackwardSGDSaI.step` (``closure`` runs
    forward and backward). Pass 1: each block's hook records its exact moments
    :math:`(n, \sum g, \sum g^2, \sum (g-\bar g)^2)`, centred two-pass in float64 over the
    whole block gradient (:func:`sai_dist.stats.reduce_block_moments` on that block alone:
    one block is one tensor here, so these *are* the block's moments), and drops the
    gradient; when that backward ends, g-SNR and the normaliser are fixed from the
    recorded moments. Pass 2: the same closure, with the RNG state of pass 1 restored (the
    same dropout masks), back-propagates the same batch and every hook makes the first
    update as in later steps. Peak at every step, step 1 included: parameters + momentum +
    one block's gradient + activations. Cost: one extra forward and backward, once. Before
    its first update pass 2 compares the first block's gradient with pass 1's record and
    refuses (``RuntimeError``, g-SNR unfixed, nothing modified) if the closure did not
    reproduce the batch. A bare ``loss.backward()`` before step 1 is refused the same way,
    so a loop cannot skip the first pass; after step 1 (or after loading a state dict
    that holds g-SNR) both ``step(closure)`` and a bare ``backward()`` train, one pass per
    step. An exception in pass 1 leaves nothing changed; one in pass 2 (an out-of-memory
    error, say) leaves g-SNR fixed and the blocks stepped so far updated, as an exception
    inside any in-backward step does.

**Same trajectory.** The update of each tensor is :meth:`SGDSaI.step_group` on that
tensor alone, the very code ``SGDSaI.step`` runs per group, so on CPU (the per-tensor
implementation) the parameters are bitwise those of the normal mode, and within
floating-point reassociation elsewhere.

**Contract.** Single process only (the replicated layout): under DDP or FSDP the hook sees
the local, not yet reduced gradient, so this raises if a multi-rank process group is
initialised; a sharded layout is refused by the constructor. One optimizer step per
``backward()``: no gradient accumulation, and ``loss.backward()`` is the whole step (there
is nothing to call afterwards; ``step(closure)`` only runs the closure). Parameters
are updated in place while backward runs; as for ``torch``'s own optimizer-in-backward,
a model must not save a parameter's detached alias for a later backward node. Each
gradient gets, as it arrives, the check ``SGDSaI.step`` makes
(:meth:`SGDSaI.check_gradient`: sparse or complex gradients, ...): a refusal raises out
of ``backward()`` with the same message, before that tensor or its state is touched (at
step 1 before anything is).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from sai_dist.layouts import ReplicatedLayout
from sai_dist.optimizer import SGDSaI
from sai_dist.state_keys import GSNR, GSNR_MAX, SCALE
from sai_dist.stats import BlockMoments, reduce_block_moments

__all__ = ["FIRST_STEP_MODES", "InBackwardSGDSaI"]

FirstStep = Literal["keep", "two_pass"]
FIRST_STEP_MODES: tuple[str, ...] = ("keep", "two_pass")

# Pass 2 of the two-pass step 1 must see the gradient of pass 1. Bitwise equal on
# deterministic kernels; the slack admits non-deterministic GPU reductions (atomics in an
# embedding backward) and still refuses a closure that drew another batch.
_REPLAY_RTOL = 1e-2


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    live = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if live else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class InBackwardSGDSaI:
    """Train with SGD-SaI updates applied during ``backward()``.

    Args:
        params: parameters (or ``(name, param)`` pairs, or param-group dicts), as for
            :class:`~sai_dist.SGDSaI`.
        first_step: ``"keep"`` (default; a bare ``loss.backward()`` is every step, step 1
            keeps one whole gradient copy) or ``"two_pass"`` (step 1 back-propagates the
            batch twice and never holds more than one block's gradient; the loop calls
            :meth:`step` with a closure, at least at step 1). See the module docstring.
        **kwargs: every other argument of :class:`~sai_dist.SGDSaI` (``lr``,
            ``momentum``, ``weight_decay``, ``eps``, ``normalize``, ``degenerate``, ...).

    The wrapped optimizer is :attr:`optimizer` (its ``state_dict``, ``param_groups`` and
    g-SNR table are the usual ones; :func:`sai_dist.gsnr_table` finds it). Call
    :meth:`remove` to detach the hooks.
    """

    def __init__(self, params: Iterable[Any], *, first_step: FirstStep = "keep", **kwargs: Any) -> None:
        if first_step not in FIRST_STEP_MODES:
            raise ValueError(f"Invalid first_step: {first_step!r} (must be one of {FIRST_STEP_MODES})")
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
        self.first_step: FirstStep = first_step
        self._group_of: dict[int, dict[str, Any]] = {}
        self._handles = []
        self._first_pending: list[Tensor] = []
        self._callback_queued = False
        # Two-pass step 1: None outside step(), else "record" (pass 1) or "update" (pass 2).
        self._phase: str | None = None
        self._recorded: list[Tensor] = []
        self._sums: Tensor | None = None  # [num_blocks, 4] float64: n, sum g, sum g^2, M2
        self._fixed = False
        self._record_done = False
        self._replay_checked = False
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if id(p) in self._group_of:
                    raise ValueError(f"parameter of shape {tuple(p.shape)} appears twice")
                self._group_of[id(p)] = group
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    # -- the training call ---------------------------------------------------------

    def step(self, closure: Callable[[], Any]) -> Any:
        """Run ``closure`` (forward and ``backward()`` of one batch; it returns the loss) so
        that the parameters are updated inside its backward; returns the loss.

        With ``first_step="two_pass"`` and g-SNR not yet fixed, the closure runs twice on
        the same RNG state (see the module docstring) and the loss of the second run is
        returned; otherwise it runs once. The closure must compute the same batch each
        time it is called: draw the batch outside it.
        """
        if not callable(closure):
            raise TypeError(
                "InBackwardSGDSaI.step(closure): closure must be a callable that runs forward and "
                f"backward() of one batch and returns the loss; got {type(closure).__name__}"
            )
        if self._phase is not None:
            raise RuntimeError("InBackwardSGDSaI.step: called from inside its own closure")
        if self.first_step == "keep" or self.optimizer.initialized:
            with torch.enable_grad():
                return closure()
        return self._two_pass(closure)

    def _two_pass(self, closure: Callable[[], Any]) -> Any:
        opt = self.optimizer
        rng = _rng_state()
        self._recorded, self._fixed, self._record_done = [], False, False
        self._sums = torch.zeros(opt.layout.num_blocks, 4, dtype=torch.float64)
        self._phase = "record"
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self._phase = None
            self._callback_queued = False
        if not self._fixed:
            if not self._recorded:
                # No backward reached a parameter: the optimizer's own warning says why.
                opt.fix_gsnr([], None)
            return loss  # an all-zero first gradient: skipped, as in the normal mode
        _set_rng_state(rng)
        self._phase, self._replay_checked = "update", False
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self._phase = None
        return loss

    # -- hooks ---------------------------------------------------------------------

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if p.grad is None:
            return
        try:
            # The gradient check SGDSaI.step makes, with its words: a sparse or complex
            # gradient, a gradient laid out unlike its tensor.
            self.optimizer.check_gradient(p)
        except Exception:
            # The backward is aborted, and with it the callback that would have consumed the
            # gradients kept so far this step: forget them, so the next backward starts afresh.
            self._first_pending = []
            self._callback_queued = False
            raise
        if self._phase == "record":
            self._record(p)
            return
        if self.first_step == "two_pass" and not self.optimizer.initialized:
            p.grad = None
            if self._phase is None:
                raise RuntimeError(
                    "InBackwardSGDSaI(first_step='two_pass'): step 1 must run through "
                    "runner.step(closure), which back-propagates the batch twice (moments, then the "
                    "first update); a bare loss.backward() cannot. Nothing was changed."
                )
            raise RuntimeError("InBackwardSGDSaI: g-SNR was not fixed by the first pass of step 1")
        if self._phase == "update" and not self._replay_checked:
            self._check_replay(p)
        if not self.optimizer.initialized:
            # Step 1: g-SNR needs every block; keep this gradient until the backward ends.
            self._first_pending.append(p)
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish_first_step)
            return
        self._step_one(p)

    def _moments_of(self, p: Tensor) -> Tensor:
        """``[num_blocks, 4]``: the exact moments of ``p``'s block(s), zero elsewhere."""
        m = reduce_block_moments(self.optimizer.layout.sources([p]), self.optimizer.layout.num_blocks, None)
        return torch.stack([m.count, m.total, m.sumsq, m.m2], 1)

    def _record(self, p: Tensor) -> None:
        if self._record_done or any(q is p for q in self._recorded):
            p.grad = None
            self._unfix()
            raise RuntimeError(
                "InBackwardSGDSaI.step: the closure back-propagated into a parameter twice (tensor of "
                f"shape {tuple(p.shape)}); one backward() per step, no gradient accumulation"
            )
        assert self._sums is not None
        self._sums += self._moments_of(p)  # a block is one tensor: its moments, exactly
        self._recorded.append(p)
        p.grad = None
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_record)

    @torch.no_grad()
    def _finish_record(self) -> None:
        self._callback_queued = False
        assert self._sums is not None
        count, total, sumsq, m2 = self._sums.unbind(1)
        moments = BlockMoments(count=count.clone(), total=total.clone(), sumsq=sumsq.clone(), m2=m2.clone())
        self._record_done = True
        self._fixed = self.optimizer.fix_gsnr(list(self._recorded), None, moments=moments)

    def _unfix(self) -> None:
        """Forget the g-SNR fixed by pass 1: the next ``step(closure)`` starts step 1 afresh."""
        for q in self._recorded:
            state = self.optimizer.state[q]
            for key in (GSNR, SCALE, GSNR_MAX):
                state.pop(key, None)
            if not state:
                del self.optimizer.state[q]
        self._fixed = False

    def _check_replay(self, p: Tensor) -> None:
        """Refuse pass 2 of step 1, before its first update, if ``p``'s gradient is not the
        one pass 1 recorded (the closure drew another batch, or the model is random)."""
        self._replay_checked = True
        assert self._sums is not None
        now = self._moments_of(p)
        blocks = now[:, 0] > 0
        before, after = self._sums[blocks], now[blocks]
        rms = (before[:, 2] / before[:, 0].clamp_min(1)).sqrt()
        same_n = bool((before[:, 0] == after[:, 0]).all())
        norm_before, norm_after = before[:, 2].sqrt(), after[:, 2].sqrt()
        norm_close = ((norm_after - norm_before).abs() <= _REPLAY_RTOL * norm_before).all()
        mean_close = ((after[:, 1] - before[:, 1]).abs() / before[:, 0] <= _REPLAY_RTOL * rms).all()
        if same_n and bool(norm_close) and bool(mean_close):
            return
        p.grad = None
        self._unfix()
        raise RuntimeError(
            "InBackwardSGDSaI.step: the second run of the closure at step 1 gave another gradient "
            f"(tensor of shape {tuple(p.shape)}: ||g|| {float(before[:, 2].sum().sqrt()):.6g} in pass 1, "
            f"{float(after[:, 2].sum().sqrt()):.6g} in pass 2). The closure must recompute the same batch: "
            "draw the batch outside it. Nothing was changed; g-SNR is not fixed."
        )

    @torch.no_grad()
    def _step_one(self, p: Tensor) -> None:
        opt = self.optimizer
        state = opt.state[p]
        if SCALE not in state:
            # A block whose first gradient comes after step 1: scaled by the fixed max, as in step().
            opt.fix_gsnr([p], opt.gsnr_max())
        opt.step_group(self._group_of[id(p)], [p])
        p.grad = None

    @torch.no_grad()
    def _finish_first_step(self) -> None:
        pending, self._first_pending = self._first_pending, []
        self._callback_queued = False
        opt = self.optimizer
        pending = [p for p in pending if p.grad is not None]
        if not opt.fix_gsnr(pending, None):
            for p in pending:  # an all-zero probe step: nothing is fixed, nothing kept
                p.grad = None
            return
        for p in pending:
            opt.step_group(self._group_of[id(p)], [p])
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
