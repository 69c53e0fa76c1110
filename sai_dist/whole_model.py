r"""One normaliser for a model split across ranks (pipeline stages, model parts).

Under pipeline parallelism each optimizer steps one stage's blocks, but SGD-SaI's
normaliser is the largest g-SNR of the *whole* model (and, under ``degenerate="max"``, so
is the g-SNR a zero-spread block gets). Each stage computes its blocks' exact g-SNR with
its own statistics group; then one tiny ``all_reduce(MAX)`` over a group that holds every
stage (the *model group*) gives every rank

.. math::
    F = \max_{\text{stages}} \max_{b\ \text{regular}} \mathrm{gsnr}_b,\qquad
    \text{gsnr\_max} = \begin{cases} F & F > 0 \\ 1 & \text{no regular block, some degenerate}\\
    \max_b \mathrm{raw}_b & \texttt{degenerate="official"}\end{cases}

Replicas in the model group (data-parallel copies of a stage) hold identical values, so a
max over them changes nothing: the group may be the whole world.

The same int64 vector carries, as ``[h, -h]`` digests (see :mod:`sai_dist.consistency`),
the options every stage must share (``normalize``, ``degenerate``, the constructor
hyperparameters), whether any stage has a non-zero gradient (a probe step of all zeros is
skipped by every stage together) and whether a stage refused the step. g-SNRs are
non-negative float64, whose IEEE bit patterns order as int64 do, so they ride the same
``MAX``. On any disagreement or refusal, a second collective (``all_gather_object``) tells
every rank which ranks said what, and every rank raises before anything is modified.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sai_dist.collectives import all_reduce
from sai_dist.consistency import RankMismatchError, digest
from sai_dist.gsnr import BlockGsnr

__all__ = ["WholeModel", "check_pipeline_group", "link_parts", "whole_model_max"]


@dataclass(frozen=True)
class WholeModel:
    """The whole model's normaliser inputs, identical on every rank of the model group.

    Attributes:
        fill: g-SNR of degenerate blocks under ``degenerate="max"``.
        gsnr_max: the model's largest g-SNR (before :func:`sai_dist.gsnr.normaliser`).
        nonzero: whether any stage had a non-zero gradient.
    """

    fill: float
    gsnr_max: float
    nonzero: bool


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", max(float(x), 0.0)))[0]


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def whole_model_max(
    group: dist.ProcessGroup | None,
    local: BlockGsnr | list[BlockGsnr] | None,
    nonzero: bool,
    options: dict[str, Any],
    *,
    refusal: BaseException | None = None,
) -> WholeModel:
    """Reduce this stage's g-SNR maxima over ``group`` (collective: every rank of the
    group calls it at step 1, refusing or not).

    Args:
        group: a group holding every stage (the model group).
        local: this stage's g-SNR (from its exact, stage-reduced moments), ``None`` when
            this rank refuses.
        nonzero: whether this stage's gradient has any non-zero element.
        options: what every stage must agree on, compared by digest.
        refusal: this rank's own error; its peers are told, and it is re-raised here.

    Raises:
        RankMismatchError: on every rank, when stages disagree on ``options`` or some rank
            refused (a refusing rank re-raises its own error instead).
    """
    reg = off = 0.0
    degenerate = False
    for part in [] if local is None else [local] if isinstance(local, BlockGsnr) else local:
        regular = part.present & ~part.degenerate
        if bool(regular.any()):
            reg = max(reg, float(part.raw[regular].max()))
        if bool(part.present.any()):
            off = max(off, float(part.raw[part.present].max()))
        degenerate = degenerate or bool(part.degenerate.any())
    h = digest(options)
    got = [int(refusal is not None), int(nonzero), _bits(reg), _bits(off), int(degenerate), h, -h]
    if group is not None:  # else: several parts on this rank are the whole model
        got = all_reduce(torch.tensor(got, dtype=torch.int64), group, dist.ReduceOp.MAX).tolist()
    refused, agree = bool(got[0]), got[5] == -got[6]
    if group is not None and (refused or not agree):
        text = None if refusal is None else f"{type(refusal).__name__}: {refusal}"
        mine = {"rank": dist.get_rank(), "refusal": text, "options": options}
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        if refusal is not None:
            raise refusal
        raise RankMismatchError(_message(gathered))
    if refusal is not None:
        raise refusal
    reg, off = _float(got[2]), _float(got[3])
    if options.get("degenerate") == "official":
        return WholeModel(fill=off, gsnr_max=off, nonzero=bool(got[1]))
    if reg > 0:
        return WholeModel(fill=reg, gsnr_max=reg, nonzero=bool(got[1]))
    return WholeModel(fill=1.0, gsnr_max=1.0 if got[4] else 0.0, nonzero=bool(got[1]))


def _message(gathered: list[dict[str, Any]]) -> str:
    lines = [f"rank {g['rank']} refused the step: {g['refusal']}" for g in gathered if g["refusal"]]
    if not lines:
        by: dict[str, list[int]] = {}
        for g in gathered:
            by.setdefault(repr(g["options"]), []).append(g["rank"])
        lines = [f"{value} on ranks {ranks}" for value, ranks in by.items()]
        head = "the pipeline stages (model parts) disagree on SGDSaI's options and hyperparameters"
    else:
        head = "a pipeline stage refused the g-SNR step"
    body = "\n  - ".join(lines)
    return (
        f"SGDSaI: {head}; nothing was changed, and every rank of the model group raises this error."
        f"\n  - {body}\nEvery stage's SGDSaI must be built with the same normalize, degenerate, lr, "
        "momentum, weight_decay, eps and maximize: the normaliser is one max over the whole model."
    )


def check_pipeline_group(group: Any, layout: Any = None) -> None:
    """Raise ``ValueError`` unless ``group`` is a process group holding this rank and, for
    DTensor stages sliced from one root mesh (``layout``), a rank of every stage."""
    if group is None:
        return
    missing = None
    if layout is not None and isinstance(group, dist.ProcessGroup):
        ranks = dist.get_process_group_ranks(group)
        missing = layout.uncovered_stages(ranks)
    if missing is not None:  # the layout knows the stages: covering them is all it takes
        if missing:
            raise ValueError(
                f"Invalid pipeline_group: it holds ranks {ranks}, none of which holds the pipeline "
                f"stage(s) at root-mesh coordinate(s) {missing} (the dims no parameter mesh covers), so "
                "their g-SNR would be left out of the normaliser. DTensor stages sliced from one root "
                "mesh need no pipeline_group; pass one with a rank of every stage, or none."
            )
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("Invalid pipeline_group: torch.distributed is not initialised")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns to non-members
        raise ValueError(
            f"Invalid pipeline_group: dist.new_group returned NON_GROUP_MEMBER, a group that holds other "
            f"ranks, not this rank {dist.get_rank()}; pass a group with one rank of every pipeline stage "
            "(or the whole world) on every rank"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"Invalid pipeline_group: {group!r} is not a torch.distributed ProcessGroup")
    if dist.get_rank(group) < 0:
        ranks = dist.get_process_group_ranks(group)
        raise ValueError(
            f"Invalid pipeline_group: it holds ranks {ranks}, not this rank {dist.get_rank()}; pass a group "
            "with one rank of every pipeline stage (or the whole world) on every rank"
        )


def link_parts(optimizers: Any) -> None:
    """Make the :class:`~sai_dist.SGDSaI` optimizers of several model parts held by this
    rank (one per part, as torchtitan's ``OptimizersContainer`` builds them for virtual
    pipeline stages) share one whole-model normaliser.

    At step 1 the first of them to step computes the statistics of every linked part that
    has gradients (all of them, after the schedule's backward), takes the max over them and
    (with a model group) over every other rank's parts in one collective, and hands each
    other part its moments and the normaliser for its own step 1, which then issues no
    collective. Every rank must link its parts the same way and step them in the same
    order. Accepts a list of optimizers or anything with an ``optimizers`` list."""
    parts = list(getattr(optimizers, "optimizers", optimizers))
    for opt in parts:
        if not hasattr(opt, "linked_parts"):
            raise TypeError(f"link_parts takes SGDSaI optimizers, got {type(opt).__name__}")
        if opt.initialized:
            raise ValueError("link_parts: link the parts before step 1 (g-SNR is already fixed)")
    for opt in parts:
        opt.linked_parts = parts
