r"""Functional SGD-SaI update, in the style of ``torch.optim.sgd``'s ``sgd()``.

Given g-SNR scales already fixed, one step on a list of tensors is

.. math::
    m &\leftarrow g \quad\text{(first step of a tensor)}, \qquad
    m \leftarrow \beta m + (1-\beta) g \quad\text{(afterwards)} \\
    p &\leftarrow p\,(1 - \eta\lambda) - \eta\, s\, m

with :math:`\beta` = ``momentum``, :math:`\eta` = ``lr``, :math:`\lambda` = ``weight_decay``
(decoupled, not scaled by g-SNR), :math:`s` the tensor's g-SNR scale and :math:`g` negated
first when ``maximize``. With ``momentum == 0`` no buffer is kept and :math:`m = g`.

An fp32 step must read p, g, m and write p, m: 20 bytes per element, the floor. Four
implementations share the contract:

- ``_single_tensor_sgd_sai``: a plain loop, the readable reference;
- ``_multi_tensor_sgd_sai`` (foreach): batches the momentum and decay passes with
  ``torch._foreach_*`` kernels and applies the scaled update per tensor with
  ``add_(alpha=...)`` (a per-tensor scalar needs no temporary, where
  ``_foreach_mul(bufs, scales)`` would allocate a second copy of every buffer). 8
  element-passes per step;
- ``_native_sgd_sai`` (fused, CPU): one call of a small C/OpenMP kernel
  (:mod:`sai_dist.native`) over the whole list, reading and writing each element once;
  built with the system compiler in well under a second and cached on disk;
- ``_compiled_sgd_sai`` (fused, CUDA): one ``torch.compile``'d (Triton) kernel per tensor,
  also one pass; flattened inputs and coefficient tensors, so one compilation serves every
  shape, lr and scale.

Selection (``fused``), as ``torch.optim`` does it: ``None`` (default) takes the fused
kernel for every tensor it supports (CPU float32 dense tensors when the native kernels
build; CUDA tensors when ``torch.compile`` works there) and the foreach/single-tensor path
for the rest, silently; ``True`` insists and raises when the kernel is unavailable;
``False`` never uses it. The per-tensor scale is a coefficient of the kernel, never a
per-element buffer, so views into a flat partition (ZeRO segments) are stepped in place.

Tensors with a 16-bit parameter or a bfloat16 / int8 buffer take
``_low_precision_sgd_sai``, the readable reference for those dtypes, and its two
single-pass kernels under the same ``fused`` rule (``True`` does not raise there: a piece
no kernel takes is stepped by the reference): :mod:`sai_dist.native_lowp` on CPU and
:mod:`sai_dist.compiled_lowp` (``torch.compile``, Triton) on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sai_dist import compiled_lowp, native, native_lowp
from sai_dist.momentum import STREAM_MOMENTUM, STREAM_PARAM, Rounding, decode, encode, round_to


def sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    scales: list[float],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
    fused: bool | None = None,
    born: Sequence[bool] | None = None,
    momentum_scales: Sequence[Tensor | None] | None = None,
    rounding: Sequence[Rounding | None] | None = None,
    round_params: bool = True,
) -> None:
    """Apply one SGD-SaI step in place.

    Args:
        params, grads: plain (local) tensors of equal shapes.
        momentum_buffers: one entry per tensor; ``None`` means the tensor's first step and
            the new buffer (``g``, negated when ``maximize``) is written back into the list.
            Ignored when ``momentum == 0``.
        scales: the fixed g-SNR scale of each tensor.
        foreach: for tensors the fused kernel does not take, use the batched
            implementation; ``None`` picks it for CUDA tensors.
        fused: ``None`` uses the single-pass kernel where supported and falls back
            silently; ``True`` requires it (``RuntimeError`` when it cannot be built, with
            nothing modified); ``False`` never uses it.
        born: per tensor, whether its (already allocated) buffer's content is to be
            replaced by ``g`` (negated when ``maximize``) this step, a first step whose
            buffer the caller allocated, e.g. uninitialised, so the kernel fills it in the
            same pass.
        momentum_scales, rounding: low-precision storage (:mod:`sai_dist.momentum`). When
            either is given, every tensor whose parameter or buffer is not float32 is
            stepped by :func:`_low_precision_sgd_sai`: ``momentum_scales[i]`` holds the int8
            block scales of an int8 buffer, ``rounding[i]`` the draws of its stochastic
            rounding (``None``: round to nearest). float32 tensors take the paths above.
        round_params: round 16-bit parameters stochastically (with ``rounding[i]``);
            ``False`` rounds them to nearest. 16-bit momentum is always rounded
            stochastically when ``rounding[i]`` is given.
    """
    n = len(params)
    if not (len(grads) == len(momentum_buffers) == len(scales) == n):
        raise ValueError("params, grads, momentum_buffers and scales must have the same length")
    if born is not None and len(born) != n:
        raise ValueError("born must have one entry per tensor")
    born = list(born) if born is not None else [False] * n
    if momentum != 0:
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                momentum_buffers[i] = torch.empty_like(grads[i]).detach()
                born[i] = True
    else:
        born = [False] * n

    if rounding is not None or momentum_scales is not None:
        low = [
            i
            for i in range(n)
            if params[i].dtype in _LOW or (momentum != 0 and momentum_buffers[i].dtype in (*_LOW, torch.int8))  # type: ignore[union-attr]
        ]
        if low:
            _low_precision_sgd_sai(
                [params[i] for i in low],
                [grads[i] for i in low],
                [momentum_buffers[i] for i in low],
                [None if momentum_scales is None else momentum_scales[i] for i in low],
                [scales[i] for i in low],
                [born[i] for i in low],
                [None if rounding is None else rounding[i] for i in low],
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                maximize=maximize,
                round_params=round_params,
                fused=fused,
            )
            keep = sorted(set(range(n)) - set(low))
            params, grads = [params[i] for i in keep], [grads[i] for i in keep]
            momentum_buffers = [momentum_buffers[i] for i in keep]
            scales, born, n = [scales[i] for i in keep], [born[i] for i in keep], len(keep)

    native_idx: list[int] = []
    compiled_idx: list[int] = []
    if fused is not False and n:
        native_idx, compiled_idx, rest_idx = _route(params, grads, momentum_buffers, momentum, bool(fused))
    else:
        rest_idx = list(range(n))

    def pick(
        idx: list[int],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], list[float], list[bool]]:
        return (
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [momentum_buffers[i] for i in idx],
            [scales[i] for i in idx],
            [born[i] for i in idx],
        )

    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
    if native_idx:
        _native_sgd_sai(*pick(native_idx), **hyper)
    if compiled_idx:
        _compiled_sgd_sai(*pick(compiled_idx), **hyper)
    if rest_idx:
        sub = pick(rest_idx)
        use_foreach = foreach if foreach is not None else all(p.is_cuda for p in sub[0])
        (_multi_tensor_sgd_sai if use_foreach else _single_tensor_sgd_sai)(*sub, **hyper)


def fused_available(device: torch.device | str) -> bool:
    """Whether ``fused=None`` finds a single-pass kernel for float32 tensors on ``device``
    (building or compiling it now if it was not yet)."""
    device = torch.device(device)
    if device.type == "cpu":
        return native.library() is not None
    return _compile_failure(device.type) is None


def fused_unavailable_reason(device: torch.device | str) -> str | None:
    """Why :func:`fused_available` is ``False`` for ``device`` (``None`` when it is not)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None if native.library() is not None else native.unavailable_reason()
    return _compile_failure(device.type)


def require_fused(device: torch.device | str, caller: str = "sgd_sai") -> None:
    """Raise ``RuntimeError`` naming why, if ``fused=True`` cannot run on ``device``."""
    reason = fused_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(
            f"{caller}(fused=True): the single-pass kernel is unavailable on {torch.device(device)} "
            f"({reason}); use fused=None (falls back to foreach) or fused=False"
        )


def _route(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor | None],
    momentum: float,
    required: bool,
) -> tuple[list[int], list[int], list[int]]:
    """Split tensor indices into (native, compiled, rest). Decided before any tensor is
    touched, so ``fused=True`` raises with nothing modified."""
    native_idx: list[int] = []
    compiled_idx: list[int] = []
    rest: list[int] = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        m = buffers[i] if momentum != 0 else None
        if p.device.type == "cpu":
            (native_idx if native.supported(p, g, m) else rest).append(i)
        elif (
            p.dtype == g.dtype
            and p.numel() >= 2
            and all(t is None or (t.is_contiguous() and t.shape == p.shape) for t in (p, g, m))
        ):
            compiled_idx.append(i)
        else:
            rest.append(i)
    if native_idx and not fused_available("cpu"):
        if required:
            require_fused("cpu")
        rest += native_idx
        native_idx = []
    if compiled_idx:
        device = params[compiled_idx[0]].device
        if not fused_available(device):
            if required:
                require_fused(device)
            rest += compiled_idx
            compiled_idx = []
    return native_idx, compiled_idx, sorted(rest)


def _coefficients(
    scale: float, born: bool, *, lr: float, momentum: float, weight_decay: float, maximize: bool
) -> tuple[int, tuple[float, float, float, float]]:
    """Kind and ``(b, c, d, a)`` of one tensor's update, see :mod:`sai_dist.native`:
    ``m = b m + c g`` (or ``m = c g`` when born), ``p = d p + a m`` (``m = g`` without
    momentum)."""
    sign = -1.0 if maximize else 1.0
    decay = 1 - lr * weight_decay
    alpha = -lr * scale
    if momentum == 0:
        return native.STEP_PLAIN, (0.0, 0.0, decay, sign * alpha)
    if born:
        return native.STEP_BORN, (0.0, sign, decay, alpha)
    return native.STEP_MOMENTUM, (momentum, sign * (1 - momentum), decay, alpha)


def _single_tensor_sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    scales: list[float],
    born: list[bool],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        grad = -grad if maximize else grad
        if momentum != 0:
            buf = momentum_buffers[i]
            assert buf is not None
            if born[i]:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - momentum)
            grad = buf
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(grad, alpha=-lr * scales[i])


_LOW = (torch.bfloat16, torch.float16)


def _low_precision_sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    momentum_scales: list[Tensor | None],
    scales: list[float],
    born: list[bool],
    rounding: list[Rounding | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    round_params: bool,
    fused: bool | None = None,
) -> None:
    """The reference for tensors stored in 16 bits or int8: the same update as
    :func:`_single_tensor_sgd_sai`, computed in float32 from the decoded buffer and the
    float32 gradient; the new buffer is encoded (stochastically rounded) and a 16-bit
    parameter written back rounded stochastically (``round_params``) or to nearest.

    Unless ``fused=False``, tensors a single-pass kernel takes go through it: on CPU
    :mod:`sai_dist.native_lowp`, elsewhere (CUDA) :mod:`sai_dist.compiled_lowp`, each the
    same update and random bits in one read and one write of every element; the loop below
    is the definition both are tested against."""
    hyper = dict(
        lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize, round_params=round_params
    )
    batch: native_lowp.Batch | None = None  # one kernel call for every CPU piece it takes
    compiled: compiled_lowp.Batch | None = None  # the pieces on other devices it takes
    compiled_idx: list[int] = []  # which piece each of compiled's is
    use_kernel = fused is not False  # until the kernel turns out unavailable
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        buf = momentum_buffers[i] if momentum != 0 else None
        target: native_lowp.Batch | compiled_lowp.Batch | None = None
        if fused is False:
            pass
        elif _takes_compiled(param):
            # Each variant is compiled once, on tiny tensors, before a real piece is touched.
            if compiled_lowp.supported(param, grad, buf, rounding[i]) and (
                compiled_lowp.variant_failure(
                    param, grad, buf, rounding[i], born=born[i], round_param=round_params
                )
                is None
            ):
                compiled = compiled if compiled is not None else compiled_lowp.Batch()
                compiled_idx.append(i)
                target = compiled
        elif use_kernel and native_lowp.supported(param, grad, buf):
            if batch is None:
                lib = native_lowp.library()  # built (and SAI_DIST_LOWP_SIMD read) once a CPU piece asks
                batch = native_lowp.Batch(lib) if lib is not None else None
                use_kernel = batch is not None
            target = batch
        if target is None:
            _reference_piece(param, grad, buf, momentum_scales[i], scales[i], born[i], rounding[i], **hyper)
            continue
        _, coef = _coefficients(
            scales[i], born[i], lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize
        )
        target.add(
            param,
            grad,
            buf,
            momentum_scales[i],
            born=born[i],
            coef=coef,
            rounding=rounding[i],
            round_param=round_params,
        )
    if batch is not None:
        batch.run()
    if compiled is not None:
        # A call that still failed to compile (a shape inductor specialises on, the
        # recompile limit) wrote nothing: the reference steps that part of its piece.
        for position, start in compiled.run():
            i = compiled_idx[position]
            key = rounding[i]
            msc = momentum_scales[i]
            _reference_piece(
                params[i].view(-1)[start:],
                grads[i].view(-1)[start:],
                None if momentum == 0 else momentum_buffers[i].view(-1)[start:],  # type: ignore[union-attr]
                None if msc is None else msc[start // compiled_lowp.BLOCK :],
                scales[i],
                born[i],
                None if key is None else key._replace(offset=key.offset + start),
                **hyper,
            )


def _takes_compiled(param: Tensor) -> bool:
    """Whether a piece on ``param``'s device goes to :mod:`sai_dist.compiled_lowp`: every
    device but the CPU, which has :mod:`sai_dist.native_lowp`. (One function, so the tests
    can route CPU tensors through the compiled kernel.)"""
    return not param.is_cpu


def _reference_piece(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    momentum_scale: Tensor | None,
    scale: float,
    born: bool,
    key: Rounding | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    round_params: bool,
) -> None:
    """One piece of :func:`_low_precision_sgd_sai`'s reference, in place."""
    work = torch.promote_types(param.dtype, torch.float32)  # float64 parameters stay float64
    g = grad.to(work)
    g = -g if maximize else g
    direction = g
    if momentum != 0:
        assert buf is not None
        if born:
            m = g
        else:
            m = decode(buf, momentum_scale).to(work)
            m.mul_(momentum).add_(g, alpha=1 - momentum)
        if m is not buf:
            encode(m, buf, momentum_scale, key, stream=STREAM_MOMENTUM)
        direction = m
    p32 = param if param.dtype == work else param.to(work)
    if weight_decay != 0:
        p32.mul_(1 - lr * weight_decay)
    p32.add_(direction, alpha=-lr * scale)
    if p32 is not param:
        param.copy_(round_to(p32, param.dtype, key if round_params else None, STREAM_PARAM))


def _multi_tensor_sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    scales: list[float],
    born: list[bool],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if not params:
        return
    if momentum != 0:
        old = [i for i, b in enumerate(born) if not b]
        new = [i for i, b in enumerate(born) if b]
        bufs: list[Tensor] = momentum_buffers  # type: ignore[assignment]
        if old:
            # lerp(m, g, 1 - beta) = beta * m + (1 - beta) * g in one read-modify-write pass;
            # maximize folds into the weight's sign: lerp toward -g is m + w(-g - m).
            old_bufs, old_grads = [bufs[i] for i in old], [grads[i] for i in old]
            if maximize:
                old_grads = torch._foreach_neg(old_grads)
            torch._foreach_lerp_(old_bufs, old_grads, 1 - momentum)
        if new:
            new_bufs, new_grads = [bufs[i] for i in new], [grads[i] for i in new]
            torch._foreach_copy_(new_bufs, new_grads)
            if maximize:
                torch._foreach_neg_(new_bufs)
        directions = bufs
    else:
        directions = torch._foreach_neg(grads) if maximize else grads
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    for param, direction, scale in zip(params, directions, scales, strict=True):
        param.add_(direction, alpha=-lr * scale)


def _native_sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    scales: list[float],
    born: list[bool],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    kinds: list[int] = []
    coefs: list[tuple[float, float, float, float]] = []
    for scale, b in zip(scales, born, strict=True):
        kind, coef = _coefficients(
            scale, b, lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize
        )
        kinds.append(kind)
        coefs.append(coef)
    buffers = momentum_buffers if momentum != 0 else [None] * len(params)
    native.step(params, grads, buffers, kinds, coefs)


# -- compiled (CUDA) kernels ---------------------------------------------------------------


def _momentum_kernel(p: Tensor, g: Tensor, m: Tensor, coef: Tensor) -> None:
    # coef = [b, c, d, a]: m = b m + c g;  p = d p + a m
    m.mul_(coef[0]).add_(g * coef[1])
    p.mul_(coef[2]).add_(m * coef[3])


def _born_kernel(p: Tensor, g: Tensor, m: Tensor, coef: Tensor) -> None:
    # coef = [_, c, d, a]: m = c g (a buffer's first step);  p = d p + a m
    m.copy_(g * coef[1])
    p.mul_(coef[2]).add_(m * coef[3])


def _plain_kernel(p: Tensor, g: Tensor, coef: Tensor) -> None:
    # coef = [_, _, d, a]: p = d p + a g, for momentum-free updates
    p.mul_(coef[2]).add_(g * coef[3])


@functools.cache
def _compiled(kernel: Callable[..., None]) -> Callable[..., None]:
    # Inputs are flattened to 1-D and the scalars travel in a small tensor, so one
    # compilation serves every shape, lr and scale.
    return torch.compile(kernel, dynamic=True, fullgraph=True)


@functools.cache
def _compile_failure(device_type: str) -> str | None:
    """Compile the three kernels once on tiny tensors of ``device_type``; the reason it
    failed, or ``None``. Run before any real tensor is touched, so a failure falls back
    (or raises) with nothing half-stepped."""
    try:
        if device_type == "cuda":
            import triton  # noqa: F401  (inductor's CUDA backend)
        p, g, m = (torch.zeros(3, device=device_type) for _ in range(3))
        coef = torch.zeros(4, device=device_type)
        _compiled(_momentum_kernel)(p, g, m, coef)
        _compiled(_born_kernel)(p, g, m, coef)
        _compiled(_plain_kernel)(p, g, coef)
    except Exception as exc:  # any compiler or backend failure means "not available"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _compiled_sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    scales: list[float],
    born: list[bool],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
    rows = [_coefficients(s, b, **hyper) for s, b in zip(scales, born, strict=True)]
    # Every tensor's coefficients go to the device in one transfer per step.
    coefs: dict[torch.device, Tensor] = {}
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        if param.device not in coefs:
            coefs[param.device] = torch.tensor([r[1] for r in rows], dtype=torch.float32, device=param.device)
        coef = coefs[param.device][i]
        kind = rows[i][0]
        flat_p, flat_g = param.view(-1), grad.view(-1)
        if kind == native.STEP_PLAIN:
            _compiled(_plain_kernel)(flat_p, flat_g, coef)
        else:
            buf = momentum_buffers[i]
            assert buf is not None
            kernel = _born_kernel if kind == native.STEP_BORN else _momentum_kernel
            _compiled(kernel)(flat_p, flat_g, buf.view(-1), coef)
