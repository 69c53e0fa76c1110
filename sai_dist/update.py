r"""One param group's update: the optimizer state of each piece, handed to ``sgd_sai`` once.

:class:`~sai_dist.SGDSaI` keeps the state (per tensor: ``momentum_buffer``, the g-SNR
scalars, and for low-precision storage the int8 block scales and the rounding counter);
this module turns a group's tensors into the flat lists :func:`sai_dist.functional.sgd_sai`
takes, one entry per piece of a block (:meth:`sai_dist.layouts.Layout.pieces`):

.. math::
    m_k \leftarrow \beta m_k + (1-\beta) g_k \;(m_k = g_k \text{ when born}),\qquad
    p_k \leftarrow p_k (1 - \eta\lambda) - \eta\, s_k\, m_k

with :math:`s_k` the fixed scale of piece :math:`k`'s block. A segment of a flat partition
is a view, so every piece is stepped where it lies, in one call for the whole group.

What the momentum is stored as is :mod:`sai_dist.momentum`'s question; here its answers are
applied: the storage dtype of a new buffer (:func:`storage_dtype`), whether a tensor takes
the low-precision path (:func:`managed`), and the keys of its random draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sai_dist import momentum as lowp
from sai_dist import native
from sai_dist.functional import sgd_sai
from sai_dist.layouts.base import Layout, Origin
from sai_dist.probe import placeholder_state
from sai_dist.state_keys import GSNR, GSNR_MAX, MOMENTUM, MOMENTUM_SCALE, MOMENTUM_SMALL, ROUNDING_STEP, SCALE
from sai_dist.stats import Piece

__all__ = [
    "managed",
    "new_buffer",
    "piece_storage",
    "placeholder",
    "step_group",
    "storage_dtype",
    "store_gsnr",
]

_SIXTEEN = (torch.bfloat16, torch.float16)


def new_buffer(
    grad: Tensor, pieces: Sequence[Piece], layout: Layout, dtype: torch.dtype | None = None
) -> Tensor:
    """An uninitialised momentum buffer shaped like ``grad`` (the step fills every piece),
    of ``dtype`` (default: the gradient's); elements no piece covers (a flat partition's
    alignment padding) are zeroed so a checkpoint never holds garbage."""
    # int8 codes are laid out in the parameter's logical (row-major) order: the block
    # scales and the rounding index follow it, whatever the gradient's strides.
    fmt = torch.contiguous_format if dtype == torch.int8 else torch.preserve_format
    buf = torch.empty_like(grad, dtype=dtype, memory_format=fmt).detach()
    native.advise_huge_pages(layout.local(buf))
    if any(piece.span is not None for piece in pieces):
        flat = layout.local(buf).reshape(-1)
        covered = torch.zeros(flat.numel(), dtype=torch.bool)
        for piece in pieces:
            if piece.span is None:
                return buf
            covered[piece.span[0] : piece.span[1]] = True
        flat[~covered.to(flat.device)] = 0
    return buf


def store_gsnr(
    state: dict[Tensor, dict[str, Any]],
    layout: Layout,
    tensors: Sequence[Tensor],
    gsnr: Tensor,
    scale: Tensor,
    gsnr_max: float,
) -> None:
    """Write the fixed g-SNR state of ``tensors``: per tensor ``gsnr`` and ``scale`` of its
    pieces' blocks (``gsnr``, ``scale``: ``[num_blocks]``; a 0-d value for a tensor of one
    piece, one value per piece otherwise) and ``gsnr_max``, all CPU float32."""
    max_t = torch.tensor(gsnr_max, dtype=torch.float32)
    # Rounded to float32 once for all blocks, then one row per tensor: a few small-tensor
    # ops per parameter instead of six (step 1 of 148 tensors: ~4 ms less).
    values32 = gsnr.to(torch.float32)
    scales32 = scale.to(torch.float32)
    for p in tensors:
        entry = state[p]
        pieces = layout.pieces(p)
        if len(pieces) == 1:
            entry[GSNR] = values32[pieces[0].block].clone()
            entry[SCALE] = scales32[pieces[0].block].clone()
        else:
            blocks = torch.tensor([piece.block for piece in pieces], dtype=torch.long)
            entry[GSNR] = values32[blocks]
            entry[SCALE] = scales32[blocks]
        entry[GSNR_MAX] = max_t.clone()


def _numels(layout: Layout, p: Tensor, origin: Sequence[Origin] | None) -> list[int]:
    """Per piece, the element count of its original parameter (``p``'s own where the
    layout cannot say: such layouts take no low-precision storage)."""
    if origin is not None:
        return [o.numel for o in origin]
    return [p.numel()] * len(layout.pieces(p))


def piece_storage(layout: Layout, p: Tensor, momentum_dtype: str | None) -> lowp.PieceStorage:
    """Where a new buffer of ``p`` keeps each piece's momentum
    (:func:`sai_dist.momentum.piece_storage` on each piece's original parameter)."""
    p_local = layout.local(p)
    lengths = [piece.view(p_local).numel() for piece in layout.pieces(p)]
    dtype = layout.local(p.grad).dtype if p.grad is not None else p_local.dtype
    numels = _numels(layout, p, layout.element_origin(p) if momentum_dtype is not None else None)
    return lowp.piece_storage(momentum_dtype, numels, lengths, dtype)


def storage_dtype(layout: Layout, p: Tensor, momentum_dtype: str | None) -> torch.dtype:
    """The dtype ``p``'s new momentum buffer is stored in: the gradient's (as before
    low-precision storage) for ``momentum_dtype=None``, else as :func:`piece_storage`
    says from the original parameters' sizes (the same under every mesh)."""
    if momentum_dtype is None:
        return layout.local(p.grad).dtype
    return piece_storage(layout, p, momentum_dtype).buffer


def managed(layout: Layout, p: Tensor, stored: torch.dtype | None) -> bool:
    """Whether ``p`` is stepped by the low-precision path (:mod:`sai_dist.momentum`): its
    parameter or buffer is not float32 and the layout gives element indices. Else the
    paths of float32 state run, as they always did (16-bit tensors rounded to nearest on
    layouts without element indices, see :func:`sai_dist.validation.check_low_precision`)."""
    low = layout.local(p).dtype in _SIXTEEN or stored in (*_SIXTEEN, torch.int8)
    return low and layout.element_origin(p) is not None


def placeholder(
    layout: Layout, p: Tensor, momentum: float, momentum_dtype: str | None, stochastic_rounding: bool | None
) -> dict[str, Tensor]:
    """A state-template probe's placeholders for ``p`` (:mod:`sai_dist.probe`) in the
    storage its real state will have."""
    pieces = layout.pieces(p)
    p_local = layout.local(p)
    st = piece_storage(layout, p, momentum_dtype) if momentum != 0 else None
    stored = None if st is None else st.buffer
    n_scales = st.num_scales if st is not None and stored == torch.int8 else None
    n_small = st.small_numel if st is not None and st.small_numel else None
    rounding = managed(layout, p, stored) and lowp.uses_rounding(
        p_local, stored, stochastic_rounding is not False
    )
    return placeholder_state(p, len(pieces), momentum, stored, n_scales, rounding, n_small)


def step_group(
    layout: Layout,
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    params: list[Tensor],
    *,
    momentum_dtype: str | None,
    stochastic_rounding: bool | None,
    seed: int,
) -> None:
    r"""Apply one step to ``params`` (tensors of ``group`` with a gradient and a fixed
    ``scale`` in ``state``): one :func:`~sai_dist.functional.sgd_sai` call for every piece
    of every tensor, each with its block's scale as a coefficient. A buffer born this step
    is allocated uninitialised and filled with :math:`\pm g` by the same pass that applies
    the update. Issues no collective."""
    momentum = group["momentum"]
    p_views: list[Tensor] = []
    d_views: list[Tensor] = []
    m_views: list[Tensor | None] = []
    scales: list[float] = []
    born: list[bool] = []
    # Low-precision storage (sai_dist.momentum): per view, int8 block scales and the
    # draws of stochastic rounding; None throughout for float32 state and parameters.
    q_views: list[Tensor | None] = []
    keys: list[lowp.Rounding | None] = []
    any_managed = False
    counters: list[Tensor] = []  # ROUNDING_STEP of each rounded tensor, advanced in one call
    for p in params:
        entry = state[p]
        pieces = layout.pieces(p)
        p_local, g_local = layout.local(p), layout.local(p.grad)
        lengths = [p_local.numel() if pc.span is None else pc.span[1] - pc.span[0] for pc in pieces]
        starts = False
        buf_local: Tensor | None = None
        if momentum != 0:
            starts = MOMENTUM not in entry
            if starts:
                new = piece_storage(layout, p, momentum_dtype)
                entry[MOMENTUM] = new_buffer(p.grad, pieces, layout, new.buffer)
                if new.buffer == torch.int8:
                    entry[MOMENTUM_SCALE] = p_local.new_zeros(new.num_scales, dtype=torch.float32)
                if new.small_numel:
                    entry[MOMENTUM_SMALL] = p_local.new_zeros(new.small_numel, dtype=torch.float32)
                    # The int8 codes under pieces kept in float32 are never read: zero,
                    # so a checkpoint holds no garbage.
                    flat = layout.local(entry[MOMENTUM]).view(-1)
                    for piece, small in zip(pieces, new.small, strict=True):
                        if small:
                            piece.view(flat).zero_()
            buf_local = layout.local(entry[MOMENTUM])
        stored = None if buf_local is None else buf_local.dtype
        # managed(), with the layout asked once (a DTensor's origin is a placement computation).
        low = p_local.dtype in _SIXTEEN or stored in (*_SIXTEEN, torch.int8)
        origin = layout.element_origin(p) if low else None  # not None where low: validation checked
        is_managed = origin is not None
        rounding = is_managed and lowp.uses_rounding(p_local, stored, stochastic_rounding is not False)
        # Only int8 buffers have scales and pieces kept apart (float32 / bf16 hold them all).
        st = None
        if buf_local is not None and buf_local.dtype == torch.int8:
            st = lowp.stored_pieces(torch.int8, _numels(layout, p, origin), lengths)
        if rounding:
            if ROUNDING_STEP not in entry:  # not setdefault: its default would be built every step
                entry[ROUNDING_STEP] = torch.tensor(0, dtype=torch.int64)
            step = int(entry[ROUNDING_STEP])
        scale_t = entry[SCALE]
        # item() for the one-piece 0-d scale: a fifth of reshape(-1).tolist()'s cost, per tensor per step
        piece_scales = [scale_t.item()] if scale_t.dim() == 0 else scale_t.reshape(-1).tolist()
        for k, (piece, scale) in enumerate(zip(pieces, piece_scales, strict=True)):
            p_views.append(piece.view(p_local))
            d_views.append(piece.view(g_local))
            q_view = None
            if buf_local is None:
                m_views.append(None)
            elif st is not None and st.small[k]:
                lo = st.small_starts[k]
                assert lo is not None
                m_views.append(entry[MOMENTUM_SMALL][lo : lo + lengths[k]])
            else:
                m_views.append(piece.view(buf_local))
                lo = None if st is None else st.scale_starts[k]
                if lo is not None:
                    all_scales = entry[MOMENTUM_SCALE]
                    count = lowp.num_scales([lengths[k]])
                    whole = lo == 0 and count == all_scales.numel()  # one piece: no slice to make
                    q_view = all_scales if whole else all_scales[lo : lo + count]
            q_views.append(q_view)
            scales.append(scale)
            born.append(starts)
            assert origin is not None or not rounding
            keys.append(lowp.Rounding(seed, step, piece.block, origin[k].offset) if rounding else None)
        if rounding:
            counters.append(entry[ROUNDING_STEP])
        any_managed = any_managed or is_managed
    if counters:
        torch._foreach_add_(counters, 1)
    if not p_views:
        return
    sgd_sai(
        p_views,
        d_views,
        m_views,
        scales,
        lr=group["lr"],
        momentum=momentum,
        weight_decay=group["weight_decay"],
        maximize=group["maximize"],
        foreach=group["foreach"],
        fused=group.get("fused"),
        born=born,
        momentum_scales=q_views if any(q is not None for q in q_views) else None,
        rounding=keys if any_managed else None,
        round_params=stochastic_rounding is not False,
    )
