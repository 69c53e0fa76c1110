r"""Functional SGD-SaI update, in the style of ``torch.optim.sgd``'s ``sgd()``.

Given g-SNR scales already fixed, one step on a list of tensors is

.. math::
    m &\leftarrow g \quad\text{(first step of a tensor)}, \qquad
    m \leftarrow \beta m + (1-\beta) g \quad\text{(afterwards)} \\
    p &\leftarrow p\,(1 - \eta\lambda) - \eta\, s\, m

with :math:`\beta` = ``momentum``, :math:`\eta` = ``lr``, :math:`\lambda` = ``weight_decay``
(decoupled, not scaled by g-SNR), :math:`s` the tensor's g-SNR scale and :math:`g` negated
first when ``maximize``. With ``momentum == 0`` no buffer is kept and :math:`m = g`.

Three implementations with the same contract:

- ``_single_tensor_sgd_sai``: a plain loop, the readable reference;
- ``_multi_tensor_sgd_sai``: batches the momentum and decay passes with ``torch._foreach_*``
  kernels and applies the scaled update per tensor with ``add_(alpha=...)`` (a per-tensor
  scalar needs no temporary, where ``_foreach_mul(bufs, scales)`` would allocate a second
  copy of every buffer). 8 element-passes over memory per step;
- ``_fused_sgd_sai``: one ``torch.compile``'d kernel per tensor that reads p, g, m once and
  writes p, m once, the 5 passes that are the bandwidth floor. Opt-in (``fused=True``): the
  first step compiles (tens of seconds on a CPU; needs a C++ compiler there, Triton on CUDA).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


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
    fused: bool = False,
) -> None:
    """Apply one SGD-SaI step in place.

    Args:
        params, grads: plain (local) tensors of equal shapes.
        momentum_buffers: one entry per tensor; ``None`` means the tensor's first step and
            the new buffer (``g``, cloned) is written back into the list. Ignored when
            ``momentum == 0``.
        scales: the fixed g-SNR scale of each tensor.
        foreach: use the batched implementation; ``None`` picks it for CUDA tensors.
        fused: use the compiled single-pass kernel (takes precedence over ``foreach``).
    """
    if not (len(params) == len(grads) == len(momentum_buffers) == len(scales)):
        raise ValueError("params, grads, momentum_buffers and scales must have the same length")
    if foreach is None:
        foreach = bool(params) and all(p.is_cuda for p in params)
    if fused:
        impl = _fused_sgd_sai
    else:
        impl = _multi_tensor_sgd_sai if foreach else _single_tensor_sgd_sai
    impl(
        params,
        grads,
        momentum_buffers,
        scales,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def _single_tensor_sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    scales: list[float],
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
            if buf is None:
                buf = momentum_buffers[i] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - momentum)
            grad = buf
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(grad, alpha=-lr * scales[i])


def _multi_tensor_sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    scales: list[float],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if not params:
        return
    if maximize:
        grads = torch._foreach_neg(grads)
    if momentum != 0:
        old = [i for i, b in enumerate(momentum_buffers) if b is not None]
        if old:
            # lerp(m, g, 1 - beta) = beta * m + (1 - beta) * g in one read-modify-write pass.
            torch._foreach_lerp_([momentum_buffers[i] for i in old], [grads[i] for i in old], 1 - momentum)
        for i, b in enumerate(momentum_buffers):
            if b is None:
                momentum_buffers[i] = torch.clone(grads[i]).detach()
        directions = momentum_buffers
    else:
        directions = grads
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    for param, direction, scale in zip(params, directions, scales, strict=True):
        param.add_(direction, alpha=-lr * scale)


def _momentum_kernel(p: Tensor, g: Tensor, m: Tensor, coef: Tensor) -> None:
    # coef = [beta, sign * (1 - beta), decay, alpha]:
    # m = beta m + (1 - beta) (sign g);  p = decay p + alpha m   (alpha = -lr s)
    m.mul_(coef[0]).add_(g * coef[1])
    p.mul_(coef[2]).add_(m * coef[3])


def _plain_kernel(p: Tensor, d: Tensor, coef: Tensor) -> None:
    # coef = [decay, alpha]: p = decay p + alpha d, for momentum-free updates and a
    # buffer's first step (m = g)
    p.mul_(coef[0]).add_(d * coef[1])


@functools.cache
def _compiled(kernel: Callable[..., None]) -> Callable[..., None]:
    # Inputs are flattened to 1-D and the scalars travel in a small tensor, so one
    # compilation serves every shape, lr and scale.
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def _flat(t: Tensor) -> Tensor:
    return t.view(-1)


def _fused_sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    scales: list[float],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    decay = 1 - lr * weight_decay
    sign = -1.0 if maximize else 1.0
    # Every tensor's coefficients go to the device in one transfer per step.
    rows: list[list[float]] = []
    for i, scale in enumerate(scales):
        alpha = -lr * scale
        if momentum == 0:
            rows.append([decay, sign * alpha, 0.0, 0.0])
        elif momentum_buffers[i] is None:
            rows.append([decay, alpha, 0.0, 0.0])
        else:
            rows.append([momentum, sign * (1 - momentum), decay, alpha])
    coefs: dict[torch.device, Tensor] = {}
    try:
        for i, (param, grad, scale) in enumerate(zip(params, grads, scales, strict=True)):
            if not (param.is_contiguous() and grad.is_contiguous()) or param.numel() < 2:
                # Odd layouts and scalars are not worth a specialised kernel.
                buffers = momentum_buffers[i : i + 1]
                _single_tensor_sgd_sai(
                    [param],
                    [grad],
                    buffers,
                    [scale],
                    lr=lr,
                    momentum=momentum,
                    weight_decay=weight_decay,
                    maximize=maximize,
                )
                momentum_buffers[i] = buffers[0]
                continue
            if param.device not in coefs:
                coefs[param.device] = torch.tensor(rows, dtype=torch.float32, device=param.device)
            coef = coefs[param.device][i]
            buf = momentum_buffers[i]
            if momentum == 0:
                _compiled(_plain_kernel)(_flat(param), _flat(grad), coef)
            elif buf is None:
                buf = momentum_buffers[i] = (-grad if maximize else grad).clone().detach()
                _compiled(_plain_kernel)(_flat(param), _flat(buf), coef)
            else:
                _compiled(_momentum_kernel)(_flat(param), _flat(grad), _flat(buf), coef)
    except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported) as exc:
        raise RuntimeError(
            "SGDSaI(fused=True) could not compile its kernel with torch.compile (a C++ compiler is "
            "needed on CPU, Triton on CUDA); use fused=False"
        ) from exc
