"""What :class:`~sai_dist.SGDSaI` refuses, and how it says so: pure checks, no state changed.

Every check raises before anything is computed or modified, naming the culprit and the fix
(docs/input_validation.md lists them with their tests):

- :func:`check_options`, :func:`check_range`, :func:`validate_group`: hyperparameters (finite real numbers in
  range), param-group keys that are typos of one, complex parameters;
- :func:`check_gradient`: the one per-tensor gradient check, made by ``SGDSaI.step`` and by
  the optimizer-in-backward hooks (:mod:`sai_dist.in_backward`) alike: sparse or complex
  gradients, tensors the layout cannot map, gradients laid out unlike their tensor;
- :func:`check_low_precision`: int8/bf16 momentum or stochastic rounding on a layout that
  cannot give element indices;
- :func:`check_loadable`: a state dict of another model or param-group split;
- :func:`refuse_non_finite`: a gradient that is not finite at the g-SNR step.

They take what they check (a layout, param groups, a state dict), not the optimizer.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sai_dist import momentum as lowp
from sai_dist.functional import require_fused
from sai_dist.gsnr import DEGENERATE_POLICIES
from sai_dist.integration_hint import calling_wrapper, missing_integration_message
from sai_dist.layouts.base import Layout, LayoutError
from sai_dist.probe import is_placeholder
from sai_dist.state_keys import GSNR, GSNR_MAX, MOMENTUM, SCALE
from sai_dist.stats import BlockMoments
from sai_dist.update import storage_dtype

__all__ = [
    "GROUP_KEYS",
    "UNSUPPORTED_KEYS",
    "check_gradient",
    "check_group_step",
    "check_loadable",
    "check_low_precision",
    "check_new_group",
    "check_options",
    "check_range",
    "checked_groups",
    "describe_block",
    "describe_blocks",
    "refuse_non_finite",
    "refuse_unhooked_wrapper",
    "tensor_name",
    "validate_group",
]

# The hyperparameters a param group may set. A param-group key one typo away from one of
# them ("momentun", "weight_deacy") is refused: torch.optim keeps unknown keys silently
# (schedulers and frameworks add their own, such as "initial_lr"), so the typo would
# otherwise train with the default.
GROUP_KEYS = ("lr", "momentum", "weight_decay", "eps", "maximize", "foreach", "fused")
# torch.optim.SGD options SGD-SaI does not implement: refused when set, not ignored.
UNSUPPORTED_KEYS = ("nesterov", "dampening")


def check_options(*, degenerate: Any, normalize: Any, check_ranks: Any) -> None:
    """Raise ``ValueError`` naming the optimizer-wide option of the wrong value or type."""
    if degenerate not in DEGENERATE_POLICIES:
        raise ValueError(f"Invalid degenerate: {degenerate!r} (must be one of {DEGENERATE_POLICIES})")
    for flag, value in (("normalize", normalize), ("check_ranks", check_ranks)):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {flag}: {value!r} (must be a bool)")


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    high_open: bool = False,
    low_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number (not a
    bool, not a Tensor) in the range. A NaN or inf hyperparameter would be baked into every
    step, and g-SNR is fixed forever from the first."""
    if isinstance(value, Tensor):
        raise ValueError(f"Invalid {name}: {name} must be a Python float, got a Tensor")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number, got {type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    above = low < value if low_open else low <= value
    ok = above and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bound = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"Invalid {name}: {value!r} (must be {'>' if low_open else '>='} {low}{bound})")


def validate_group(group: dict[str, Any], index: int) -> None:
    """Raise ``ValueError`` naming the culprit for a group's invalid hyperparameter, a key
    that is a typo of one, or a complex parameter. ``group`` is complete (defaults filled
    in); ``params`` may be saved indices (``load_state_dict``)."""
    where = f" in param group {index}"
    for key in group:
        if not isinstance(key, str) or key in GROUP_KEYS or key in ("params", "param_names"):
            continue
        if key in UNSUPPORTED_KEYS:
            if group[key]:
                raise ValueError(
                    f"Invalid param-group key {key!r}{where}: SGDSaI does not implement "
                    f"torch.optim.SGD's {key}; remove it"
                )
            continue
        close = difflib.get_close_matches(key, GROUP_KEYS, n=1, cutoff=0.8)
        if close:
            raise ValueError(
                f"Unknown param-group key {key!r}{where}: did you mean {close[0]!r}? (SGDSaI's keys: "
                f"{', '.join(GROUP_KEYS)})"
            )
    try:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        # eps > 0: it is the only bound on g-SNR when a block's std is tiny, and g-SNR is
        # fixed forever; with eps = 0 one near-constant block would own the max and
        # freeze every other block, and degenerate="official" would divide by zero.
        check_range("eps", group["eps"], 0.0, low_open=True)
    except ValueError as e:
        raise ValueError(f"{e}{where}") from None
    if not isinstance(group.get("maximize", False), bool):
        raise ValueError(f"Invalid maximize: {group['maximize']!r} (must be a bool){where}")
    for flag in ("fused", "foreach"):
        # isinstance, not membership: 1 == True would slip through `in (None, True, False)`.
        if group.get(flag) is not None and not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}: {group[flag]!r} (must be None or a bool){where}")
    names = group.get("param_names")
    for i, p in enumerate(group["params"]):
        if isinstance(p, Tensor) and p.is_complex():
            name = f" ({names[i]})" if names is not None and i < len(names) else ""
            raise ValueError(
                "SGDSaI does not support complex parameters: "
                f"param_groups[{index}]['params'][{i}]{name}, shape {tuple(p.shape)}, dtype {p.dtype}. "
                "g-SNR is a norm over a standard deviation of real numbers; hold the real and "
                "imaginary parts as real parameters instead."
            )


def check_new_group(group: dict[str, Any], index: int, stochastic_rounding: bool | None) -> None:
    """The checks of a param group ``add_param_group`` adds as ``param_groups[index]``: its
    hyperparameters (:func:`validate_group`) and its tensors' dtypes for low-precision
    storage (:func:`sai_dist.momentum.check_params`), each tensor named by its place."""
    validate_group(group, index)
    names = group.get("param_names") or [""] * len(group["params"])
    where = [f"param_groups[{index}]['params'][{i}]" + (f" ({n})" if n else "") for i, n in enumerate(names)]
    lowp.check_params(group["params"], where, stochastic_rounding)


def check_gradient(layout: Layout, p: Tensor, *, hint_wrapper: bool = False) -> None:
    """Raise, changing nothing, if ``p.grad`` (not ``None``) cannot be stepped:
    ``RuntimeError`` for a sparse or complex gradient, :class:`LayoutError` for a tensor
    ``layout`` cannot map (with ``hint_wrapper``, an automatic layout: naming the missing
    integration import when a wrapper that needs one is on the call stack) or a gradient
    laid out unlike its tensor (:meth:`Layout.check_grad`).

    The one per-tensor gradient check: ``SGDSaI.step`` makes it for every tensor before it
    computes anything, the optimizer-in-backward hook for each gradient as it arrives.
    """
    if p.grad.is_sparse:
        raise RuntimeError(
            f"SGDSaI does not support sparse gradients ({layout.describe(p)}); "
            "use dense gradients (e.g. nn.Embedding(sparse=False))."
        )
    if p.grad.is_complex():
        raise RuntimeError(
            f"SGDSaI does not support complex gradients ({layout.describe(p)}, gradient dtype "
            f"{p.grad.dtype}); g-SNR is defined for real tensors."
        )
    try:
        layout.pieces(p)
    except LayoutError as e:
        wrapper = calling_wrapper() if hint_wrapper else None
        if wrapper is None:
            raise
        raise LayoutError(f"{missing_integration_message(wrapper)} ({e})") from None
    layout.check_grad(p)


def check_group_step(
    layout: Layout,
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    params: list[Tensor],
    *,
    momentum_dtype: str | None,
    stochastic_rounding: bool | None,
) -> None:
    """The checks of one group's tensors that have a gradient, beyond each gradient's own
    (:func:`check_gradient`): low-precision storage the layout supports, and with
    ``fused=True`` the single-pass kernel on every device."""
    check_low_precision(layout, state, group, params, momentum_dtype, stochastic_rounding)
    if group.get("fused") is True:
        for device in {layout.local(p).device for p in params}:
            require_fused(device, caller="SGDSaI")


def checked_groups(
    layout: Layout,
    state: dict[Tensor, dict[str, Any]],
    param_groups: Sequence[dict[str, Any]],
    *,
    momentum_dtype: str | None,
    stochastic_rounding: bool | None,
    hint_wrapper: bool,
) -> list[tuple[dict[str, Any], list[Tensor]]]:
    """Each param group with its tensors that have a gradient, for ``SGDSaI.step``; raises,
    before anything is computed, for a gradient the step cannot take (:func:`check_gradient`
    per tensor, :func:`check_group_step` per group)."""
    stepped: list[tuple[dict[str, Any], list[Tensor]]] = []
    for group in param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            check_gradient(layout, p, hint_wrapper=hint_wrapper)
        check_group_step(
            layout,
            state,
            group,
            params,
            momentum_dtype=momentum_dtype,
            stochastic_rounding=stochastic_rounding,
        )
        stepped.append((group, params))
    return stepped


def refuse_unhooked_wrapper(auto_layout: bool) -> None:
    """Raise :class:`~sai_dist.layouts.LayoutError` naming the missing integration import
    when a wrapper that needs one (fairscale OSS) steps an automatic layout across ranks:
    each rank would normalise by the max of its own partition."""
    if not auto_layout or not (dist.is_available() and dist.is_initialized()):
        return
    wrapper = calling_wrapper()
    if wrapper is not None and wrapper.refuse and dist.get_world_size() > 1:
        raise LayoutError(missing_integration_message(wrapper))


def check_low_precision(
    layout: Layout,
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    params: list[Tensor],
    momentum_dtype: str | None,
    stochastic_rounding: bool | None,
) -> None:
    """Refuse, before anything is modified, a tensor whose int8/bf16 momentum or
    stochastically rounded parameter needs element indices the layout cannot give."""
    for p in params:
        entry = state.get(p, {})
        if group["momentum"] == 0:
            stored = None
        elif MOMENTUM in entry:
            stored = layout.local(entry[MOMENTUM]).dtype
        else:
            stored = storage_dtype(layout, p, momentum_dtype)
        low_buffer = momentum_dtype is not None and stored not in (None, torch.float32)
        rounded = stochastic_rounding is True and layout.local(p).dtype in (torch.bfloat16, torch.float16)
        # Asked only where needed: a DTensor's origin is a placement computation per call.
        if (low_buffer or rounded) and layout.element_origin(p) is None:
            setting = (
                f"momentum_dtype={momentum_dtype!r}"
                if low_buffer
                else f"stochastic_rounding=True for a {layout.local(p).dtype} parameter"
            )
            raise ValueError(
                f"SGDSaI: {setting} is not supported for {layout.describe(p)} under "
                f"{type(layout).__name__}: its random draws and quantization blocks are keyed on the "
                "element's index in the original parameter, which this layout cannot give. Use "
                "momentum_dtype='float32' (and stochastic_rounding=False for 16-bit parameters) here."
            )


def describe_block(layout: Layout, param_groups: Sequence[dict[str, Any]], block: int) -> str:
    """A block's name for a message: the layout's, else the position of the tensor that
    holds it whole (``param_groups[0]['params'][2] (shape (4,))``)."""
    name = layout.block_name(block)
    if name != f"block {block}":
        return name
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if any(piece.block == block and piece.span is None for piece in layout.pieces(p)):
                return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
    return name


def describe_blocks(layout: Layout, param_groups: Sequence[dict[str, Any]], blocks: list[int]) -> str:
    """The first ten of ``blocks`` named (:func:`describe_block`), the rest counted."""
    names = ", ".join(describe_block(layout, param_groups, b) for b in blocks[:10])
    return names + (f" and {len(blocks) - 10} more" if len(blocks) > 10 else "")


def refuse_non_finite(layout: Layout, param_groups: Sequence[dict[str, Any]], moments: BlockMoments) -> None:
    """Raise ``RuntimeError``, naming the blocks, if a gradient at the g-SNR step is not
    finite: g-SNR is fixed once from it, so the step is refused with nothing changed."""
    bad = (~moments.finite()).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(
            f"SGDSaI: non-finite gradient (inf or NaN) at the g-SNR step in "
            f"{describe_blocks(layout, param_groups, bad)}; "
            "g-SNR is fixed once from this gradient, so the step was refused and nothing was "
            "changed. Check the loss, or let a GradScaler skip the step."
        )


def tensor_name(layout: Layout, gi: int, pi: int, p: Tensor) -> str:
    """``param_groups[gi]['params'][pi]``, with the parameter's name when known."""
    where = f"param_groups[{gi}]['params'][{pi}]"
    pieces = layout.pieces(p)
    if len(pieces) == 1 and pieces[0].span is None:
        name = layout.block_name(pieces[0].block)
        if name != f"block {pieces[0].block}":
            return f"{where} ({name})"
    return where


def check_loadable(
    state_dict: Any, param_groups: Sequence[dict[str, Any]], defaults: dict[str, Any], layout: Layout
) -> None:
    """Raise ``ValueError`` naming the mismatch if ``state_dict`` cannot belong to an
    optimizer with ``param_groups`` (and ``defaults``) over ``layout``. ``torch.optim``
    checks group counts and sizes only; a state dict of another model with the same counts
    would load momentum of the wrong shape."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("SGDSaI.load_state_dict: expected a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    prefix = (
        "SGDSaI.load_state_dict: the state dict is not this optimizer's (another model or "
        "param-group split?):"
    )
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"{prefix} it has {len(saved_groups)} param groups, this optimizer {len(param_groups)}"
        )
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{prefix} param group {gi} has {len(saved['params'])} parameters in it, "
                f"{len(group['params'])} here"
            )
        # The loaded hyperparameters replace the current ones: validate them too.
        validate_group({**defaults, **saved}, gi)
    maxima: set[float] = set()
    entries = state_dict["state"]
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        for pi, (key, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
            entry = entries.get(key, {})
            buf = entry.get(MOMENTUM)
            if buf is not None and (not isinstance(buf, Tensor) or tuple(buf.shape) != tuple(p.shape)):
                got = tuple(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
                raise ValueError(
                    f"{prefix} the momentum_buffer of {tensor_name(layout, gi, pi, p)} has shape {got}, "
                    f"the parameter {tuple(p.shape)}"
                )
            lowp.check_loaded(entry, layout, p, tensor_name(layout, gi, pi, p))
            pieces = len(layout.pieces(p))
            for k in (GSNR, SCALE):
                if k in entry and torch.as_tensor(entry[k]).numel() != pieces:
                    raise ValueError(
                        f"{prefix} {k} of {tensor_name(layout, gi, pi, p)} has "
                        f"{torch.as_tensor(entry[k]).numel()} values, the tensor holds {pieces} "
                        "block piece(s)"
                    )
            if GSNR_MAX in entry and not is_placeholder(entry):
                maxima.add(float(entry[GSNR_MAX]))
    if len(maxima) > 1:
        raise ValueError(
            f"SGDSaI.load_state_dict: the state dict holds {len(maxima)} different gsnr_max values "
            f"({sorted(maxima)[:4]}); g-SNR is normalised by one max per model, so it was assembled from "
            "different runs"
        )
