"""Regression tests from a correctness review of the DTensor layout (gloo, CPU)."""

from __future__ import annotations

import pytest

from tests import review_ranks
from tests.distributed import run_ranks


@pytest.mark.distributed
def test_gradient_placements_unlike_the_parameter_are_refused_with_nothing_changed():
    for out in run_ranks(review_ranks.grad_placement_mismatch, 2, timeout=180):
        # A Partial gradient on a Replicate parameter: its local tensor is a summand.
        assert out["partial"].startswith("LayoutError:") and "Partial(sum)" in out["partial"]
        # A Shard(1) gradient on a Shard(0) parameter: local shapes differ.
        assert out["shard1"].startswith("LayoutError:") and "Shard(dim=1)" in out["shard1"]
        for key in ("partial", "shard1"):
            assert "global shape (4, 6)" in out[key]
            assert out[f"{key}_unchanged"] and out[f"{key}_state"] == 0
