r"""``SGDSaI``: SGD with momentum and learning-rate scaling at initialisation.

Xu, Xiang, Cai, Wen, "No More Adam: Learning Rate Scaling at Initialization is All You
Need", arXiv 2412.11768. On the first step, every block (one parameter tensor of the
original model) gets a fixed scale from its gradient signal-to-noise ratio
(:mod:`sai_dist.gsnr`); every step is then SGD with momentum and decoupled weight decay
with that scale (:mod:`sai_dist.functional`).

The class orchestrates; it knows no sharding wrapper. A :class:`~sai_dist.layouts.Layout`
maps the tensors it steps onto model blocks, the statistics engine
(:mod:`sai_dist.stats`) reduces the moments of those blocks across ranks once, and from
then on each piece carries a fixed scale: no collective is issued after step 1. The
class keeps the constructor, the step, the state-dict load and the integration API; the
pieces live below it: what it refuses in :mod:`sai_dist.validation`, the step that fixes
g-SNR in :mod:`sai_dist.gsnr_step`, the cross-rank fingerprints in
:mod:`sai_dist.consistency`, one group's update in :mod:`sai_dist.update`, the load
around torch's cast in :mod:`sai_dist.loading`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from sai_dist import gsnr_step, loading, update, validation
from sai_dist import momentum as lowp
from sai_dist.gsnr import DegeneratePolicy
from sai_dist.layouts import Layout, auto_layout, follows_rebinding
from sai_dist.probe import drop_placeholders
from sai_dist.state_keys import GSNR_MAX
from sai_dist.stats import BlockMoments
from sai_dist.whole_model import check_pipeline_group

__all__ = ["SGDSaI"]


class SGDSaI(Optimizer):
    r"""SGD-SaI: momentum SGD whose per-block learning-rate scale is fixed at step 1.

    .. math::
        s_b &= \frac{\mathrm{gsnr}_b}{\max_{b'} \mathrm{gsnr}_{b'}},\quad
        \mathrm{gsnr}_b = \frac{\lVert g_b\rVert_2}{\operatorname{std}(g_b) + \epsilon}
        \quad\text{(step 1 only)} \\
        m_b &\leftarrow \beta m_b + (1-\beta) g_b \quad (m_b = g_b \text{ at first}),\qquad
        p_b \leftarrow p_b (1 - \eta\lambda) - \eta\, s_b\, m_b

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of param-group
            dicts, as for any ``torch.optim.Optimizer``. Names, when given, appear in
            warnings.
        lr: learning rate :math:`\eta` (default 1e-2).
        momentum: :math:`\beta` in ``[0, 1)`` (default 0.9); 0 keeps no buffer.
        weight_decay: decoupled decay :math:`\lambda` (default 1e-2), multiplied by the
            group's lr and not by the g-SNR scale.
        eps: added to the standard deviation (default 1e-8).
        normalize: divide every g-SNR by the largest one of the whole model (official code
            v1.0.4, default); ``False`` uses raw g-SNR as the scale (v1.0.3, the PyPI
            release).
        maximize: maximise the objective instead of minimising it.
        degenerate: ``"max"`` (default) or ``"official"``: what a block whose gradient has
            zero spread (one element, all zeros, constant) gets; see :mod:`sai_dist.gsnr`.
        fused: apply the whole update in one pass over memory (read p, g, m; write p, m:
            the bandwidth floor; foreach takes 8 element-passes). ``None`` (default) uses it
            wherever it is supported, falling back silently to foreach or the single-tensor
            loop: on CPU float32 tensors a small C kernel built once with the system
            compiler and cached (:mod:`sai_dist.native`), on CUDA a ``torch.compile``'d
            kernel (compiled at the first step). ``True`` requires it (``RuntimeError``
            with nothing changed when it is unavailable); ``False`` never uses it.
            Low-precision state has its own single-pass kernels (:mod:`sai_dist.native_lowp`
            on CPU, :mod:`sai_dist.compiled_lowp` on CUDA), used with ``None`` and ``True``
            where they apply; a tensor neither takes is stepped by the reference loop.
        foreach: for tensors the fused kernel does not take (or with ``fused=False``),
            batch the momentum and decay passes with foreach kernels; ``None`` picks them
            for CUDA tensors.
        check_ranks: when a multi-rank process group is initialised, check at the g-SNR
            step, at the first step of blocks added later and in :meth:`load_state_dict`
            that every rank holds the same param groups, hyperparameters, model and (for
            replicated layouts) gradient statistics and loaded g-SNR, raising
            :class:`~sai_dist.consistency.RankMismatchError` on every rank otherwise. The
            ranks compared are the layout's group, or the whole world for layouts whose
            statistics are local (DDP). ``False`` for ranks that step different tensors on
            purpose (pipeline stages holding plain tensors, independent runs per rank).
        layout: how the stepped tensors map onto model blocks. ``None`` picks the layout for
            the tensors given (plain tensors, or DTensors from FSDP2/HSDP); integrations
            that rebind param groups pass their own.
        pipeline_group: for a model split across ranks on plain tensors (pipeline stages
            without DTensor meshes), a process group holding at least one rank of every
            stage (the world will do): the normaliser becomes the largest g-SNR of the whole
            model, reduced over it at step 1 (:mod:`sai_dist.whole_model`). DTensor stages
            sliced from one root mesh need none: the root's other dims are found by the
            layout. Every rank passes its own such group.

    Invalid input raises before anything is modified: hyperparameters out of range,
    non-finite or of the wrong type (``ValueError`` naming it; ``eps`` must be > 0), a
    param-group key that is a typo of a hyperparameter, complex parameters, sparse or
    complex gradients, gradients that are not finite at the g-SNR step, and a state dict
    from another model. See ``docs/input_validation.md``.

    State: per tensor, ``momentum_buffer`` (same placement as the parameter: a shard for a
    sharded one) and the CPU scalars ``gsnr``, ``scale`` and ``gsnr_max``. Their presence
    marks g-SNR as fixed, so ``load_state_dict`` restores it and a resumed run never
    recomputes it from a later gradient.

    Every rank must call :meth:`step` together: the first step reduces statistics across
    the layout's process group (one batched collective per pass). Later steps issue none,
    except the step at which a block first gets a gradient if it had none at step 1.

    **Integration API.** What sai_dist's own integrations call on the optimizer (the
    optimizer-in-backward hooks, DeepSpeed, the g-SNR table), documented so they need no
    private name; ordinary training uses :meth:`step` only.

    - :meth:`gsnr_max`: the g-SNR max fixed at step 1, or ``None`` before (a probe's NaN
      placeholders count as not fixed). Local, no collective.
    - :meth:`check_gradient` ``(p)``: the per-tensor gradient check :meth:`step` makes
      (:func:`sai_dist.validation.check_gradient`); raises with nothing modified.
    - :meth:`fix_gsnr` ``(tensors, gsnr_max, refusal=None, moments=None)``: compute and store
      g-SNR and scale of the blocks ``tensors`` hold, exactly as :meth:`step` does (the
      consistency check, the statistics engine, the degenerate policy, the normaliser);
      returns ``False``, changing nothing, for an all-zero first gradient. Collective like a
      g-SNR step.
    - :meth:`step_group` ``(group, params)``: the update of ``params`` of ``group`` (each
      with a gradient and a fixed scale), the very code :meth:`step` runs per group; no
      collective, no check.
    - :meth:`model_group`: the group holding every part of the model when this optimizer
      steps one part (``pipeline_group`` or the layout's), or ``None``.
    - :attr:`linked_parts`: the optimizers of this rank's other model parts sharing one
      normaliser, set by :func:`sai_dist.link_parts`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 1e-2,
        eps: float = 1e-8,
        normalize: bool = True,
        maximize: bool = False,
        *,
        degenerate: DegeneratePolicy = "max",
        foreach: bool | None = None,
        fused: bool | None = None,
        check_ranks: bool = True,
        layout: Layout | None = None,
        momentum_dtype: str | torch.dtype | None = None,
        stochastic_rounding: bool | None = None,
        seed: int = 0,
        pipeline_group: dist.ProcessGroup | None = None,
    ) -> None:
        check_pipeline_group(pipeline_group)
        validation.check_options(degenerate=degenerate, normalize=normalize, check_ranks=check_ranks)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        self.normalize = normalize
        self.degenerate: DegeneratePolicy = degenerate
        self.check_ranks = check_ranks
        self.pipeline_group = pipeline_group
        self._layout: Layout | None = layout
        # Low-precision storage (sai_dist.momentum): optimizer-wide, like normalize.
        self.momentum_dtype = lowp.check_settings(momentum_dtype, stochastic_rounding, seed)
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        # Whether the layout was picked here (and so can be rebuilt for copied tensors).
        self._auto_layout = layout is None
        #: This rank's other model parts sharing one normaliser (:func:`sai_dist.link_parts`).
        self.linked_parts: list[SGDSaI] = []
        super().__init__(params, defaults)
        if self._layout is None:
            self._attach_auto_layout()
        check_pipeline_group(pipeline_group, self._layout)

    def _attach_auto_layout(self) -> None:
        self._layout = auto_layout(p for g in self.param_groups for p in g["params"])
        for group in self.param_groups:
            self._register(group)

    def _follow_rebound_params(self) -> None:
        """Rebuild the automatic layout when the param groups were rebound to other
        parameters before g-SNR is fixed (see :func:`sai_dist.layouts.follows_rebinding`):
        accelerate and other clients build the optimizer first, then shard the model
        (FSDP2) and swap ``group['params']`` for the new DTensor parameters."""
        if self._auto_layout and self._layout is not None and not self.initialized:
            if follows_rebinding(self._layout, [p for g in self.param_groups for p in g["params"]]):
                self._attach_auto_layout()

    # torch.optim.Optimizer pickles only defaults, state and param_groups; the optimizer-wide
    # options live outside defaults, and a layout maps tensors by identity, so a copy
    # (copy.deepcopy, torch.save of the object) rebuilds the automatic layout for its own
    # tensors. An integration's explicit layout travels as is.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["normalize"] = self.normalize
        state["degenerate"] = self.degenerate
        state["check_ranks"] = self.check_ranks
        for key in ("momentum_dtype", "stochastic_rounding", "seed"):
            state[key] = getattr(self, key)
        state["pipeline_group"] = None  # a process group does not pickle
        state["linked_parts"] = []  # links to other optimizers are this process's
        state["_auto_layout"] = self._auto_layout
        state["_layout"] = None if self._auto_layout else self._layout
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("check_ranks", True)
        for key, default in (("momentum_dtype", None), ("stochastic_rounding", None), ("seed", 0)):
            self.__dict__.setdefault(key, default)
        self.__dict__.setdefault("pipeline_group", None)
        self.__dict__.setdefault("linked_parts", [])
        if self.__dict__.get("_layout") is None:
            self._auto_layout = True
            self._attach_auto_layout()

    # -- param groups --------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        """The layout that maps stepped tensors onto model blocks."""
        assert self._layout is not None
        return self._layout

    def use_layout(self, layout: Layout) -> None:
        """Replace the layout, for integrations whose wrapper rebinds the param groups to its
        own tensors after construction (DeepSpeed ZeRO's flat partitions, say).

        Must happen before g-SNR is fixed: state computed under one layout does not
        describe another's tensors. The current param groups are registered with it.
        """
        if self.initialized:
            raise RuntimeError("SGDSaI.use_layout: g-SNR is already fixed; attach the layout before step 1")
        self._layout = layout
        self._auto_layout = False
        for group in self.param_groups:
            self._register(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validation.check_new_group(group, len(self.param_groups) - 1, self.stochastic_rounding)
            if self._layout is not None:
                self._register(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _register(self, group: dict[str, Any]) -> None:
        self.layout.register(group["params"])
        if "param_names" in group:
            self.layout.name_blocks(group["params"], group["param_names"])

    # -- g-SNR ---------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether g-SNR has been fixed (by a first step or a loaded state dict)."""
        return self.gsnr_max() is not None

    def gsnr_max(self) -> float | None:
        """The largest g-SNR of the model, fixed at step 1 (or loaded); ``None`` before.
        A probe's NaN placeholders (:mod:`sai_dist.probe`) count as not fixed. Local."""
        for state in self.state.values():
            if GSNR_MAX in state:
                value = float(state[GSNR_MAX].reshape(-1)[0])
                if not math.isnan(value):  # NaN: a probe's placeholder (sai_dist.probe)
                    return value
        return None

    def model_group(self) -> dist.ProcessGroup | None:
        """The group holding every part of the model, when this optimizer steps one part:
        ``pipeline_group``, or the layout's (DTensor stages sliced from one root mesh);
        ``None`` for the whole model (or no multi-rank process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.pipeline_group if self.pipeline_group is not None else self.layout.model_group
        return group if group is not None and dist.get_world_size(group) > 1 else None

    def fix_gsnr(
        self,
        tensors: list[Tensor],
        gsnr_max: float | None,
        refusal: BaseException | None = None,
        moments: BlockMoments | None = None,
    ) -> bool:
        """Compute and store g-SNR and scale for every block held by ``tensors``: step 1
        when ``gsnr_max is None`` (the normaliser is fixed here), late blocks otherwise.
        ``False``, changing nothing, for an all-zero first gradient. Collective: every rank
        calls it together. The contract of every argument, and the steps, are those of
        :func:`sai_dist.gsnr_step.fix_gsnr`."""
        return gsnr_step.fix_gsnr(self, tensors, gsnr_max, refusal, moments)

    # -- step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step; see the class docstring for the update.

        Raises, with nothing modified: ``RuntimeError`` for sparse or complex gradients, for
        tensors the layout cannot map, for non-finite gradients at the g-SNR step, and with
        ``fused=True`` when the single-pass kernel is unavailable;
        :class:`~sai_dist.consistency.RankMismatchError` when ranks disagree at a step that
        fixes g-SNR (see ``check_ranks``). At later steps gradients are not inspected, as
        in ``torch.optim``: a non-finite gradient then reaches the parameters (a GradScaler
        skips such steps).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        gsnr_max = self.gsnr_max()
        if gsnr_max is None:
            self._follow_rebound_params()
            drop_placeholders(self.state)  # a probe's; this step may fix g-SNR for real
        # Once per tensor: a parameter listed twice (torch.optim allows it, with a warning)
        # must not feed its gradient into the block statistics twice.
        new = gsnr_step.tensors_without_gsnr(self)
        try:
            if gsnr_max is None:
                validation.refuse_unhooked_wrapper(self._auto_layout)
            stepped = self._validated_groups()
        except Exception as refusal:
            if gsnr_max is None or new:
                # A step that fixes g-SNR is collective: peers must hear of the refusal.
                self.fix_gsnr(new, gsnr_max, refusal)
            raise
        if gsnr_max is None:
            # Step 1 fixes g-SNR from every block that has a gradient, across all groups.
            if not self.fix_gsnr(new, None):
                return loss
        elif new:
            self.fix_gsnr(new, gsnr_max)

        for group, params in stepped:
            self.step_group(group, params)
        return loss

    def check_gradient(self, p: Tensor) -> None:
        """Refuse, changing nothing, a gradient of ``p`` that :meth:`step` cannot take
        (:func:`sai_dist.validation.check_gradient` under this optimizer's layout)."""
        validation.check_gradient(self.layout, p, hint_wrapper=self._auto_layout)

    def _validated_groups(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Each group with its tensors that have a gradient; raises, before anything is
        computed, for a gradient the step cannot take (:func:`sai_dist.validation.checked_groups`)."""
        return validation.checked_groups(
            self.layout,
            self.state,
            self.param_groups,
            momentum_dtype=self.momentum_dtype,
            stochastic_rounding=self.stochastic_rounding,
            hint_wrapper=self._auto_layout,
        )

    def step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Update ``params`` of ``group`` (each with a gradient and a fixed scale): the code
        :meth:`step` runs per group, :func:`sai_dist.update.step_group`. No collective."""
        update.step_group(
            self.layout,
            self.state,
            group,
            params,
            momentum_dtype=self.momentum_dtype,
            stochastic_rounding=self.stochastic_rounding,
            seed=self.seed,
        )

    # -- checkpoints ---------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; the g-SNR scalars inside it mean g-SNR is never recomputed.

        ``torch.optim.Optimizer`` casts loaded state to each parameter's dtype, which for a
        bf16 parameter would round the scales; they are set aside and restored as CPU
        float32.

        Raises ``ValueError``, with nothing modified, for a state dict of another model or
        param-group split (group count or sizes, a momentum buffer or g-SNR of another
        shape, more than one ``gsnr_max``) or with invalid hyperparameters; and, when
        ``check_ranks`` and a multi-rank group is initialised,
        :class:`~sai_dist.consistency.RankMismatchError` on every rank when the ranks load
        different g-SNR or hyperparameters. In that case it is collective: every rank of
        the check group loads together, as DCP and DeepSpeed do.
        """
        self._follow_rebound_params()
        loading.load_state_dict(self, state_dict, super().load_state_dict)
