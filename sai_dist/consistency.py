r"""Cross-rank consistency: the ranks that share SGD-SaI state must agree on it.

Data-parallel replicas and the shards of one model only stay one model if every rank
builds its optimizer identically: the same param groups, hyperparameters, model, and (for
replicated layouts, where each rank computes g-SNR from its own copy of the gradient) the
same gradient statistics. A config edited on one node or a different model on one rank
would otherwise train divergent replicas without a word, or, when the block counts differ,
feed the statistics collectives buffers of different sizes (a hang on NCCL, undefined on
gloo).

:func:`check_ranks` is called where SGD-SaI fixes state that lives forever (the g-SNR step,
the first step of blocks added later, ``load_state_dict``). Each rank reduces a *fingerprint*
of named fields: a 62-bit digest per field, as ``[h, -h]``, in one ``all_reduce(MAX)`` of a
fixed-size int64 tensor, so the call can never mismatch itself and ``max(h) == -max(-h)``
tells every rank, identically, whether all ranks hold the same value. Only on a mismatch
does a second collective (``all_gather_object``) bring the differing fields' values, so the
error names what differs and which rank holds what; every rank raises the same
:class:`RankMismatchError` before anything is modified.

A rank that refuses the step or the load locally (a sparse gradient, a checkpoint of
another model) still joins the collective, flagged, so its peers raise too instead of
waiting in a collective it will never reach.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sai_dist.collectives import collective_device
from sai_dist.probe import is_placeholder
from sai_dist.state_keys import GSNR_MAX, MOMENTUM_SCALE, MOMENTUM_SMALL, ROUNDING_STEP, SCALE
from sai_dist.stats import BlockMoments, reduce_block_moments

__all__ = [
    "FIELDS",
    "RankMismatchError",
    "agreed_moments",
    "check_group",
    "check_ranks",
    "digest",
    "group_fields",
    "load_fingerprint",
    "step_fingerprint",
]

#: The fields of a fingerprint, in the order they travel. ``call`` says which collective
#: call this is (``step`` / ``load_state_dict``), so two ranks in different calls are told
#: so instead of hanging; ``refusal`` whether this rank refused locally (its message is
#: shown on a mismatch); the others are built by :func:`step_fingerprint` and
#: :func:`load_fingerprint` (docs/design.md, "Cross-rank consistency").
FIELDS: tuple[str, ...] = (
    "call",
    "refusal",
    "options",
    "gsnr_max",
    "param_groups",
    "blocks",
    "tensors",
    "values",
)

# Digests are 62-bit so that -h never overflows int64.
_MASK = (1 << 62) - 1
# Differences listed in one message; the rest are counted.
_SHOWN = 8


class RankMismatchError(RuntimeError):
    """Ranks that must hold identical optimizer configuration or state do not. Raised on
    every rank of the group, with nothing modified."""


def digest(value: Any) -> int:
    """A 62-bit digest of ``repr(value)``, the same in every process (unlike ``hash``,
    which Python salts per process for strings). ``repr`` of a float is exact."""
    raw = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little") & _MASK


def check_ranks(
    group: dist.ProcessGroup,
    fields: dict[str, Any],
    *,
    refusal: str | None,
    when: str,
) -> None:
    """Raise :class:`RankMismatchError` on every rank of ``group`` unless all ranks hold
    equal ``fields`` and either all or none refused.

    Collective: every rank of ``group`` calls it together, whatever its local outcome. One
    ``all_reduce`` of ``2 * len(FIELDS)`` int64 on success; an ``all_gather_object`` of the
    differing fields in addition on a mismatch.

    Args:
        group: the process group whose ranks must agree (more than one rank).
        fields: a value per name of :data:`FIELDS` except ``refusal``: plain Python values
            (numbers, strings, ``None``, lists, tuples, dicts), compared by ``repr``.
        refusal: this rank's local error message, or ``None``. Only its presence is
            compared: ranks that all refuse raise their own errors afterwards.
        when: where the check runs, for the message (``"the g-SNR step (step 1)"``).
    """
    names = [n for n in FIELDS if n != "refusal"]
    if sorted(fields) != sorted(names):
        raise ValueError(f"check_ranks needs exactly the fields {names}, got {sorted(fields)}")
    values = {**fields, "refusal": refusal is not None}
    local = torch.tensor([digest(values[n]) for n in FIELDS], dtype=torch.int64)
    buf = torch.cat([local, -local]).to(collective_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    buf = buf.cpu()
    k = len(FIELDS)
    differ = [n for i, n in enumerate(FIELDS) if int(buf[i]) != -int(buf[k + i])]
    if not differ or (refusal is not None and "refusal" not in differ):
        # Every rank refused: each raises its own error, which names the cause (a missing
        # integration, a bad gradient); what else differs between refusing ranks is noise.
        return
    shown = {n: (refusal if n == "refusal" else values[n]) for n in differ}
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, {"when": when, **shown}, group=group)
    ranks = [dist.get_global_rank(group, r) for r in range(len(gathered))]
    raise RankMismatchError(_message(differ, gathered, ranks))


def _differences(values: Sequence[Any], path: str) -> list[tuple[str, dict[str, list[int]]]]:
    """The leaves where per-rank ``values`` differ, as ``(path, {repr: rank indices})``,
    descending into lists and dicts of the same shape on every rank."""
    reprs = [repr(v) for v in values]
    if len(set(reprs)) == 1:
        return []
    first = values[0]
    if all(isinstance(v, list | tuple) for v in values):
        if len({len(v) for v in values}) != 1:
            return _leaf([len(v) for v in values], f"len({path})")
        out: list[tuple[str, dict[str, list[int]]]] = []
        for i in range(len(first)):
            out += _differences([v[i] for v in values], f"{path}[{i}]")
        return out
    if all(isinstance(v, dict) for v in values):
        keys = [list(v) for v in values]
        if any(k != keys[0] for k in keys):
            return _leaf([sorted(map(str, v)) for v in values], f"{path} keys")
        out = []
        for key in keys[0]:
            out += _differences([v[key] for v in values], f"{path}[{key!r}]")
        return out
    return _leaf(values, path)


def _leaf(values: Sequence[Any], path: str) -> list[tuple[str, dict[str, list[int]]]]:
    by_value: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        by_value.setdefault(repr(v), []).append(r)
    return [(path, by_value)]


def _message(differ: list[str], gathered: list[dict[str, Any]], ranks: list[int]) -> str:
    """The same text on every rank: built from the gathered values only."""
    whens: dict[str, list[int]] = {}
    for i, g in enumerate(gathered):
        whens.setdefault(g["when"], []).append(i)
    if len(whens) == 1:
        when = next(iter(whens))
    else:  # ranks in different calls
        when = " / ".join(f"{w} ({_ranks(rs, ranks)})" for w, rs in whens.items())
    lines: list[str] = []
    if "refusal" in differ:
        for r, shown in zip(ranks, gathered, strict=True):
            if shown["refusal"] is not None:
                lines.append(f"rank {r} refused it: {shown['refusal']}")
    found: list[tuple[str, dict[str, list[int]]]] = []
    # A refusing rank describes what it has, not what it was asked to take in; its error
    # is the whole story, so the other fields are not listed after it.
    for name in differ if "refusal" not in differ else ():
        found += _differences([g[name] for g in gathered], name)
    for path, by_value in found[:_SHOWN]:
        where = "; ".join(f"{value} on {_ranks(rs, ranks)}" for value, rs in by_value.items())
        lines.append(f"{path}: {where}")
    if len(found) > _SHOWN:
        lines.append(f"... and {len(found) - _SHOWN} more differences")
    if not lines:  # unreachable unless a value's repr is not deterministic
        lines.append(f"fields {differ} differ")
    body = "\n  - ".join(lines)
    return (
        f"SGDSaI: the {len(ranks)} ranks disagree at {when}; nothing was changed, and every rank raises "
        f"this error.\n  - {body}\n"
        "Every rank must build SGDSaI identically (same model, param groups, hyperparameters and "
        "checkpoint): a config edited on one node or a different model gives this. Ranks that train "
        "different tensors on purpose (pipeline stages on plain tensors, independent runs) pass "
        "check_ranks=False."
    )


def _ranks(indices: list[int], ranks: list[int]) -> str:
    got = [ranks[i] for i in indices]
    return f"rank {got[0]}" if len(got) == 1 else f"ranks {got}"


# -- the fingerprints SGDSaI exchanges ------------------------------------------------------
#
# Built from what the optimizer holds (its layout, param groups and optimizer-wide options),
# passed in: this module knows no optimizer class. ``layout`` is a sai_dist.layouts.Layout.


def check_group(layout: Any, enabled: bool) -> dist.ProcessGroup | None:
    """The ranks that must agree on an optimizer over ``layout``, or ``None`` when there is
    nothing to compare (``enabled`` False, no multi-rank process group): the layout's group,
    or the world for layouts whose statistics are local (DDP replicas are the classic case
    of ranks that must agree and never talk)."""
    if not enabled or not (dist.is_available() and dist.is_initialized()):
        return None
    group = layout.group
    if group is None:
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def group_fields(layout: Any, group: dict[str, Any], size: int) -> dict[str, Any]:
    """What must be equal across ranks in a param group: its size (unless the layout gives
    ranks different parameters) and the hyperparameters of the update (foreach/fused only
    change rounding)."""
    fields = {k: group.get(k) for k in ("lr", "momentum", "weight_decay", "eps", "maximize")}
    if layout.ranks_hold_different_params:
        return fields
    return {"params": size, **fields}


def common_fields(layout: Any, call: str, options: dict[str, Any], gsnr_max: float | None) -> dict[str, Any]:
    """The fields of every check: the call, the optimizer-wide ``options`` (``normalize``,
    ``degenerate``), the g-SNR max (``None`` before step 1) and the layout's signature."""
    return {"call": call, "options": options, "gsnr_max": gsnr_max, "blocks": layout.signature()}


def step_fingerprint(
    layout: Any,
    param_groups: Sequence[dict[str, Any]],
    options: dict[str, Any],
    gsnr_max: float | None,
    moments: BlockMoments | None,
) -> dict[str, Any]:
    """Fields of the step check: which tensors have a gradient, and for layouts whose
    statistics are local (each rank computes g-SNR from its own copy of the gradient), the
    block ``moments`` themselves."""
    values: dict[str, Any] = {}
    if moments is not None:
        stats = torch.stack([moments.count, moments.total, moments.sumsq, moments.m2], 1).tolist()
        values["gradient statistics"] = {
            layout.block_name(b): dict(zip(("n", "sum", "sum_sq", "m2"), row, strict=True))
            for b, row in enumerate(stats)
            if row[0] > 0
        }
    tensors = {
        f"param_groups[{gi}]['params'][{pi}]": "grad" if p.grad is not None else "no grad"
        for gi, g in enumerate(param_groups)
        for pi, p in enumerate(g["params"])
    }
    return {
        **common_fields(layout, "step", options, gsnr_max),
        "param_groups": [group_fields(layout, g, len(g["params"])) for g in param_groups],
        "tensors": {} if layout.ranks_hold_different_params else tensors,
        "values": values,
    }


def load_fingerprint(
    layout: Any,
    param_groups: Sequence[dict[str, Any]],
    defaults: dict[str, Any],
    options: dict[str, Any],
    state_dict: dict[str, Any],
) -> dict[str, Any]:
    """Fields of the load check: the g-SNR max, hyperparameters and per-tensor state keys
    being loaded, and the scales of tensors that are whole blocks (the same on every rank;
    a flat partition's pieces differ by rank)."""
    entries = state_dict["state"]
    gsnr_max = next(
        (float(e[GSNR_MAX]) for e in entries.values() if GSNR_MAX in e and not is_placeholder(e)), None
    )
    tensors: dict[str, Any] = {}
    scales: dict[str, float] = {}
    for gi, (saved, group) in enumerate(zip(state_dict["param_groups"], param_groups, strict=True)):
        for pi, (key, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
            entry = entries.get(key, {})
            pieces = layout.pieces(p)
            keys = sorted(entry)
            if any(piece.span is not None for piece in pieces):
                # A flat partition's low-precision storage follows the pieces it holds (int8
                # scales, float32 small pieces, the rounding counter of an int8 buffer):
                # rightly different by rank, so only the keys every rank holds are compared.
                keys = [k for k in keys if k not in (MOMENTUM_SCALE, MOMENTUM_SMALL, ROUNDING_STEP)]
            tensors[f"param_groups[{gi}]['params'][{pi}]"] = keys
            if SCALE in entry and len(pieces) == 1 and pieces[0].span is None:
                scales[layout.block_name(pieces[0].block)] = float(entry[SCALE])
    return {
        **common_fields(layout, "load_state_dict", options, gsnr_max),
        "param_groups": [
            group_fields(layout, {**defaults, **saved}, len(saved["params"]))
            for saved in state_dict["param_groups"]
        ],
        **(
            {"tensors": {}, "values": {}}
            if layout.ranks_hold_different_params
            else {"tensors": tensors, "values": {"loaded scales": scales}}
        ),
    }


def agreed_moments(
    layout: Any,
    tensors: list[Tensor],
    gsnr_max: float | None,
    refusal: BaseException | None,
    *,
    check: dist.ProcessGroup | None,
    param_groups: Sequence[dict[str, Any]],
    options: dict[str, Any],
) -> BlockMoments:
    """Block moments of ``tensors``' gradients, once every rank of ``check`` (the optimizer's
    :func:`check_group`) has agreed that it may compute them; raises ``refusal`` (this rank's
    own validation error) after joining the check, so peers raise instead of waiting in a
    collective. ``gsnr_max is None``: the g-SNR step; otherwise the first step of late blocks.

    Order: the fixed-size check comes before the statistics collectives, whose sizes depend
    on the model, so a different model on one rank is named, not a hang. For layouts with
    local statistics the moments are computed first (no collective) and compared in the same
    check. Collective over ``check`` and the statistics group.
    """
    # Late blocks may be fresh on some ranks only (OSS): the layout names the group that is
    # safe for them, and where that is no group, no rank may wait in a check either.
    group = layout.group if gsnr_max is None else layout.late_group
    check = check if group is layout.group else None
    moments = None
    if refusal is None and group is None:
        try:
            moments = reduce_block_moments(layout.sources(tensors), layout.num_blocks, None)
        except Exception as e:  # joins the check below as a refusal
            refusal = e
    if check is not None:
        late = "the first step of blocks added after step 1"
        when = "the g-SNR step (step 1)" if gsnr_max is None else late
        fields = step_fingerprint(
            layout, param_groups, options, gsnr_max, moments if refusal is None else None
        )
        text = None if refusal is None else f"{type(refusal).__name__}: {refusal}"
        check_ranks(check, fields, refusal=text, when=when)
    if refusal is not None:
        raise refusal
    if moments is None:
        moments = reduce_block_moments(layout.sources(tensors), layout.num_blocks, group)
    return moments
