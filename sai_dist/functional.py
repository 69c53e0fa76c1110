r"""Functional SGD-SaI update, in the style of ``torch.optim.sgd``'s ``sgd()``.

Given g-SNR scales already fixed, one step on a list of tensors is

.. math::
    m &\leftarrow g \quad\text{(first step of a tensor)}, \qquad
    m \leftarrow \beta m + (1-\beta) g \quad\text{(afterwards)} \\
    p &\leftarrow p\,(1 - \eta\lambda) - \eta\, s\, m

with :math:`\beta` = ``momentum``, :math:`\eta` = ``lr``, :math:`\lambda` = ``weight_decay``
(decoupled, not scaled by g-SNR), :math:`s` the tensor's g-SNR scale and :math:`g` negated
first when ``maximize``. With ``momentum == 0`` no buffer is kept and :math:`m = g`.

Two implementations with the same contract: ``_single_tensor_sgd_sai``, a plain loop that
is the readable reference, and ``_multi_tensor_sgd_sai``, which batches the momentum and
decay passes with ``torch._foreach_*`` kernels. The scaled update is applied per tensor
with ``add_(alpha=...)``: a per-tensor scalar needs no temporary, where
``_foreach_mul(bufs, scales)`` would allocate a second copy of every buffer.
"""

from __future__ import annotations

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
) -> None:
    """Apply one SGD-SaI step in place.

    Args:
        params, grads: plain (local) tensors of equal shapes.
        momentum_buffers: one entry per tensor; ``None`` means the tensor's first step and
            the new buffer (``g``, cloned) is written back into the list. Ignored when
            ``momentum == 0``.
        scales: the fixed g-SNR scale of each tensor.
        foreach: use the batched implementation; ``None`` picks it for CUDA tensors.
    """
    if not (len(params) == len(grads) == len(momentum_buffers) == len(scales)):
        raise ValueError("params, grads, momentum_buffers and scales must have the same length")
    if foreach is None:
        foreach = bool(params) and all(p.is_cuda for p in params)
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
