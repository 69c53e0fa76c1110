"""Regression tests from a correctness review of the DTensor layout (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import dtensor_edge_ranks
from tests.support.ranks import run_ranks


@pytest.mark.distributed
def test_gradient_placements_unlike_the_parameter_are_refused_with_nothing_changed():
    for out in run_ranks(dtensor_edge_ranks.grad_placement_mismatch, 2, timeout=180):
        # A Partial gradient on a Replicate parameter: its local tensor is a summand.
        assert out["partial"].startswith("LayoutError:") and "Partial(sum)" in out["partial"]
        # A Shard(1) gradient on a Shard(0) parameter: local shapes differ.
        assert out["shard1"].startswith("LayoutError:") and "Shard(dim=1)" in out["shard1"]
        for key in ("partial", "shard1"):
            assert "global shape (4, 6)" in out[key]
            assert out[f"{key}_unchanged"] and out[f"{key}_state"] == 0


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) <= rel)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_late_block_and_resume_before_it_match_single_process(world, tmp_path):
    ref = dtensor_edge_ranks.late_reference()
    assert "late.weight" in ref["table"] and ref["table"]["late.weight"]["scale"] > 0
    for out in run_ranks(dtensor_edge_ranks.late_block_fsdp2, world, str(tmp_path / "ckpt"), timeout=240):
        for run in ("straight", "resumed"):
            got = out[run]
            assert set(got["params"]) == set(ref["params"])
            for name, expected in ref["params"].items():
                assert _close(torch.tensor(got["params"][name]), expected, 1e-5), (run, name)
            assert set(got["table"]) == set(ref["table"])
            for name, row in ref["table"].items():
                for key in ("gsnr", "scale"):
                    assert abs(got["table"][name][key] - row[key]) <= 1e-6 * abs(row[key]), (run, name, key)


@pytest.mark.distributed
def test_one_dimensional_meshes_over_part_of_the_world_reduce_over_their_own_ranks():
    for out in run_ranks(dtensor_edge_ranks.sub_world_meshes, 4, timeout=180):
        for got, expected in zip(out["gsnr"], out["expected"], strict=True):
            assert abs(got - expected) <= 1e-6 * expected
