"""Comparing a sharded run with the single-process reference: the tolerances the distributed
tests hold every wrapper to, and the relative errors they are measured in."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

PARAM_RTOL = 1e-5
TABLE_RTOL = 1e-6


def max_param_error(params: dict[str, Any], expected: dict[str, torch.Tensor]) -> float:
    """Largest over parameters of max|got - ref| / max|ref|."""
    assert set(params) == set(expected)
    worst = 0.0
    for name, want in expected.items():
        got = torch.as_tensor(np.asarray(params[name]))
        assert got.shape == want.shape, name
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def max_table_error(table: dict[str, dict[str, float]], expected: dict[str, dict[str, float]]) -> float:
    assert list(table) == list(expected)
    worst = 0.0
    for name, want in expected.items():
        assert table[name]["numel"] == want["numel"], name
        for key in ("gsnr", "scale"):
            worst = max(worst, abs(table[name][key] - want[key]) / abs(want[key]))
    return worst
