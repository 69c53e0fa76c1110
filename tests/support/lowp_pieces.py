"""Pieces of low-precision state for the kernel tests: what a fresh optimizer holds."""

from __future__ import annotations

import torch

from sai_dist import momentum as lowp


def fresh_piece(
    n: int, param_dtype: torch.dtype, buf_dtype: torch.dtype | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A parameter of ``n`` random values and a buffer that was never written: NaN (float
    buffers), random codes and NaN scales (int8), so a kernel that reads a born buffer
    shows it. Returns ``(param, buffer, int8 scales)``."""
    p = torch.randn(n, generator=gen).to(param_dtype)
    if buf_dtype is None:
        buf = None
    elif buf_dtype == torch.int8:
        buf = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
    else:
        buf = torch.full((n,), float("nan"), dtype=buf_dtype)
    scales = torch.full((lowp.num_scales([n]),), float("nan")) if buf_dtype == torch.int8 else None
    return p, buf, scales
