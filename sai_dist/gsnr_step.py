r"""The step that fixes g-SNR: step 1 (the normaliser of the whole model) and late blocks.

For the blocks ``tensors`` hold, :func:`fix_gsnr` runs, in order:

1. the moments, agreed across ranks (:func:`sai_dist.consistency.agreed_moments`: the
   cross-rank check, then the statistics engine's two batched reductions), or those a
   linked model part already reduced for this one;
2. the refusal of non-finite gradients (:func:`sai_dist.validation.refuse_non_finite`);
3. at step 1 with model parts (``pipeline_group``, DTensor stages, :func:`sai_dist.link_parts`),
   the whole model's normaliser (:mod:`sai_dist.whole_model`);
4. an all-zero first gradient skipped (a state-template probe gets placeholders);
5. :math:`\mathrm{gsnr}_b` by the degenerate policy (:mod:`sai_dist.gsnr`), the normaliser
   fixed at step 1, and :math:`s_b = \mathrm{gsnr}_b / \max_{b'} \mathrm{gsnr}_{b'}` (or
   :math:`\mathrm{gsnr}_b` with ``normalize=False``) stored per piece
   (:func:`sai_dist.update.store_gsnr`).

This is :class:`~sai_dist.SGDSaI`'s own orchestration, split out of the class so that it
reads like ``torch.optim.SGD``: every function takes the optimizer (``opt``, typed ``Any``
because the class imports this module and imports run one way) and reads and writes its
state, param groups and options as its methods did. Integrations call the class's
documented methods (:meth:`~sai_dist.SGDSaI.fix_gsnr`), never this module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sai_dist import consistency, update, validation
from sai_dist.gsnr import block_gsnr, max_gsnr, normaliser
from sai_dist.probe import is_probe
from sai_dist.state_keys import SCALE
from sai_dist.stats import BlockMoments
from sai_dist.warning_categories import DegenerateGradientWarning, ZeroGradientStepWarning, warn
from sai_dist.whole_model import whole_model_max

__all__ = ["fix_gsnr", "options", "tensors_without_gsnr"]


def fix_gsnr(
    opt: Any,
    tensors: list[Tensor],
    gsnr_max: float | None,
    refusal: BaseException | None = None,
    moments: BlockMoments | None = None,
) -> bool:
    """Compute and store g-SNR and scale for every block held by ``tensors``.

    ``gsnr_max is None`` means step 1: the normaliser is fixed here from these blocks.
    Otherwise the blocks are late arrivals scaled by the max fixed at step 1. Returns
    ``False``, changing nothing, when every gradient is exactly zero at step 1 (a probe
    step, e.g. a mixed-precision wrapper's first call, must not fix g-SNR). With
    ``refusal`` (this rank refused the step), joins the cross-rank check and raises it.
    Collective over the check group and the layout's group: every rank calls it together.
    ``moments`` given (single process only: the optimizer-in-backward two-pass step 1
    recorded them block by block) are used as the blocks' moments instead of reading
    the gradients of ``tensors``, which may be gone.
    """
    model = opt.model_group() if gsnr_max is None else None
    linked = opt.__dict__.pop("_linked_step1", None) if gsnr_max is None and refusal is None else None
    if linked is not None:  # a part linked with this one reduced it already
        moments, whole = linked
    else:
        try:
            if moments is None:
                moments = agreed_moments(opt, tensors, gsnr_max, refusal)
            refuse_non_finite(opt, moments)
        except Exception as e:
            if model is not None:  # the other stages wait in the whole-model max: tell them
                whole_model_max(model, None, False, stage_options(opt), refusal=e)
            raise
        whole = None
        if gsnr_max is None and (model is not None or opt.linked_parts):
            whole = whole_model(opt, model, moments)
    if gsnr_max is None and (float(moments.sumsq.sum()) == 0.0 if whole is None else not whole.nonzero):
        return skip_zero_step(opt, tensors)
    fill = gsnr_max if whole is None else whole.fill
    g = block_gsnr(moments, block_eps(opt), opt.degenerate, fill=fill)
    if gsnr_max is None:
        gsnr_max = max_gsnr(g) if whole is None else whole.gsnr_max
    divisor = normaliser(gsnr_max, opt.normalize)
    degenerate = g.degenerate.nonzero().flatten().tolist()
    if degenerate and opt.degenerate == "max":
        names = validation.describe_blocks(opt.layout, opt.param_groups, degenerate)
        warn(
            f"SGDSaI: gradient with zero spread (one element, all zeros or constant) at the g-SNR "
            f"step in {names}: no noise estimate, so it gets the largest regular g-SNR "
            "(scale 1 when normalised). Pass degenerate='official' for the official formula.",
            DegenerateGradientWarning,
        )
    update.store_gsnr(opt.state, opt.layout, tensors, g.value, g.value / divisor, gsnr_max)
    return True


def skip_zero_step(opt: Any, tensors: list[Tensor]) -> bool:
    """An all-zero first gradient fixes nothing: a state-template probe (every lr 0,
    DCP / torchtitan) gets placeholders of the state's shapes, anything else a warning."""
    if tensors and is_probe(opt.param_groups):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    opt.state[p] = update.placeholder(
                        opt.layout, p, group["momentum"], opt.momentum_dtype, opt.stochastic_rounding
                    )
        return False
    # No tensor with a gradient at all is a different mistake from zero gradients: a
    # step() before backward(), or an optimizer built from tensors the model no longer
    # uses (e.g. model.parameters() taken before fully_shard replaced them).
    hint = (
        ""
        if tensors
        else " (no parameter has a gradient at all: was backward() called, and was SGDSaI built "
        "from the parameters the model uses now, e.g. after fully_shard / DDP wrapping?)"
    )
    warn(
        f"SGDSaI: every gradient is zero at the first step{hint}; skipping it without fixing "
        "g-SNR, applying weight decay or touching momentum.",
        ZeroGradientStepWarning,
    )
    return False


def options(opt: Any) -> dict[str, Any]:
    return {"normalize": opt.normalize, "degenerate": opt.degenerate}


def agreed_moments(
    opt: Any, tensors: list[Tensor], gsnr_max: float | None, refusal: BaseException | None
) -> BlockMoments:
    """:func:`sai_dist.consistency.agreed_moments` for this optimizer."""
    return consistency.agreed_moments(
        opt.layout,
        tensors,
        gsnr_max,
        refusal,
        check=consistency.check_group(opt.layout, opt.check_ranks),
        param_groups=opt.param_groups,
        options=options(opt),
    )


def tensors_without_gsnr(opt: Any) -> list[Tensor]:
    """Tensors with a gradient and no fixed scale yet, each once: a parameter listed
    twice (torch.optim allows it) must not feed its gradient into the statistics twice."""
    return list(
        dict.fromkeys(
            p
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None and SCALE not in opt.state.get(p, ())
        )
    )


def whole_model(opt: Any, model: dist.ProcessGroup | None, moments: BlockMoments) -> Any:
    """The whole model's normaliser at step 1, over this optimizer's blocks, those of
    the other model parts linked with it on this rank (:func:`sai_dist.link_parts`,
    whose moments are computed here and kept for their own step 1) and, with
    ``model``, every other rank's parts."""
    parts = [q for q in opt.linked_parts if q is not opt and not q.initialized]
    gsnrs = [block_gsnr(moments, block_eps(opt), opt.degenerate)]
    nonzero = float(moments.sumsq.sum()) != 0.0
    kept: dict[int, BlockMoments] = {}
    try:
        for q in parts:
            q._validated_groups()
            q_moments = agreed_moments(q, tensors_without_gsnr(q), None, None)
            refuse_non_finite(q, q_moments)
            gsnrs.append(block_gsnr(q_moments, block_eps(q), q.degenerate))
            nonzero = nonzero or float(q_moments.sumsq.sum()) != 0.0
            kept[id(q)] = q_moments
    except Exception as e:
        if model is not None:
            whole_model_max(model, None, False, stage_options(opt), refusal=e)
        raise
    whole = whole_model_max(model, gsnrs, nonzero, stage_options(opt))
    if whole.nonzero:
        for q in parts:
            q._linked_step1 = (kept[id(q)], whole)
    return whole


def refuse_non_finite(opt: Any, moments: BlockMoments) -> None:
    validation.refuse_non_finite(opt.layout, opt.param_groups, moments)


def block_eps(opt: Any) -> Tensor:
    """Per-block epsilon from the param groups (the default for blocks none names)."""
    layout = opt.layout
    eps = torch.full((layout.num_blocks,), float("nan"), dtype=torch.float64)
    for p, group in ((p, g) for g in opt.param_groups for p in g["params"]):
        for piece in layout.pieces(p):
            eps[piece.block] = group["eps"]
    return layout.block_eps(eps).nan_to_num(opt.defaults["eps"])


def stage_options(opt: Any) -> dict[str, Any]:
    """What every part's optimizer must share for one whole-model normaliser."""
    keys = ("lr", "momentum", "weight_decay", "eps", "maximize")
    return {**options(opt), **{k: opt.defaults[k] for k in keys}}
