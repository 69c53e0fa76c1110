"""Pipeline parallel (``torch.distributed.pipelining``: ``PipelineStage`` with
``ScheduleGPipe`` / ``Schedule1F1B``, 2 micro-batches) with FSDP2 and TP inside the
stages, against the single-process SGDSaI run on the whole model.

Each stage's optimizer steps its own layers, yet every scale must be the whole model's:
g-SNR over the largest g-SNR of *every* stage. DTensor stages sliced from one
``(pp, dp, tp)`` mesh find the other stages by themselves (one extra tiny all_reduce at
step 1: four in all); plain-tensor stages name them with ``pipeline_group``, and without
it train a different algorithm (the negative control below).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.distributed import parallel3d_ranks
from tests.distributed.parallel3d_checks import GSNR_RTOL, check
from tests.support.ranks import run_ranks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ref() -> dict[str, Any]:
    return parallel3d_ranks.reference()


def covers_model(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """The stages' tables together are the model's; whole_model=True gives it on every rank."""
    names = {n for out in results for n in out["table"]}
    assert names == set(ref["table"])
    for out in results:
        assert set(out["whole_table"]) == set(ref["table"])
        for name, row in out["whole_table"].items():
            for key in ("gsnr", "scale"):
                assert abs(row[key] - ref["table"][name][key]) <= GSNR_RTOL * abs(ref["table"][name][key])


def test_pipeline_x_fsdp2_4_ranks_1f1b(ref):
    results = run_ranks(parallel3d_ranks.launch, 4, 2, 2, 1, {"schedule": "1f1b"}, timeout=400)
    covers_model(results, ref)
    check(results, ref, {"dist.all_reduce": 4})
    for out in results:  # bad input: a pipeline group inside one stage
        msg = out["dp_as_pipeline_group"]
        assert msg.startswith("ValueError: Invalid pipeline_group"), msg
        other = 1 - out["coord"]["pp"]
        assert f"coordinate(s) [({other},)]" in msg, msg


@pytest.mark.slow
def test_pipeline_x_fsdp2_x_tensor_parallel_8_ranks(ref):
    results = run_ranks(parallel3d_ranks.launch, 8, 2, 2, 2, timeout=500)
    covers_model(results, ref)
    assert results[0]["placements"]["layers.0.q.weight"].startswith("(_StridedShard(dim=0")
    check(results, ref, {"dist.all_reduce": 4})


def test_plain_tensor_pipeline_needs_and_takes_pipeline_group(ref):
    named = run_ranks(parallel3d_ranks.launch, 2, 2, 1, 1, {"pipeline_group": True}, timeout=300)
    covers_model(named, ref)
    # No statistics group (each stage holds its tensors whole): only the whole-model max.
    check(named, ref, {"dist.all_reduce": 1})
    # Negative control: without the group each stage normalises by its own max.
    alone = run_ranks(parallel3d_ranks.launch, 2, 2, 1, 1, {"opt": {"check_ranks": False}}, timeout=300)
    worst = max(
        abs(row["scale"] - ref["table"][n]["scale"]) / ref["table"][n]["scale"]
        for out in alone
        for n, row in out["table"].items()
    )
    # The two stages' maxima are close on this model (2.2e-4 apart), still 200x the tolerance.
    assert worst > 100 * GSNR_RTOL


def test_bad_input_on_every_rank():
    results = run_ranks(parallel3d_ranks.bad_input, 2, timeout=300)
    for rank, out in enumerate(results):
        assert "device meshes over different ranks" in out["roots"]
        assert "not slices of one root mesh" in out["roots"]
        assert "Partial on mesh dim(s) [1]" in out["partial"]
        assert out["stranger_group"].startswith("ValueError: Invalid pipeline_group")
        assert f"not this rank {rank}" in out["stranger_group"]
        assert out["lr"].startswith("RankMismatchError")
        assert "'lr': 0.1" in out["lr"] and "'lr': 0.2" in out["lr"] and "ranks [1]" in out["lr"]
        assert out["lr_untouched"]
        assert out["refusal_untouched"]
        assert out["gsnr_max"] == pytest.approx(max(o["local_max"] for o in results), rel=1e-6)
    assert "RuntimeError: SGDSaI: non-finite gradient" in results[1]["refusal"]
    assert results[0]["refusal"].startswith("RankMismatchError")
    assert "rank 1 refused the step: RuntimeError: SGDSaI: non-finite" in results[0]["refusal"]


@pytest.mark.parametrize("mode", ["one", "linked"])
def test_model_parts_interleaved_schedule(ref, mode):
    """Two parts per rank (ScheduleInterleaved1F1B): one SGDSaI over both, or one per part
    linked by sai_dist.link_parts, train the whole model's SGD-SaI."""
    results = run_ranks(parallel3d_ranks.train_parts, 2, mode, timeout=300)
    covers_model(results, ref)
    # "one": the stage check is off (plain stages), the whole-model max is the only
    # collective; "linked": the same single collective, issued by the first part to step.
    check(results, ref, {"dist.all_reduce": 1})


def test_unlinked_model_parts_are_a_different_algorithm(ref):
    results = run_ranks(parallel3d_ranks.train_parts, 2, "unlinked", timeout=300)
    worst = max(
        abs(row["scale"] - ref["table"][n]["scale"]) / ref["table"][n]["scale"]
        for out in results
        for n, row in out["table"].items()
    )
    assert worst > 100 * GSNR_RTOL


def test_dcp_per_stage_resume_and_reshard(ref, tmp_path):
    """Save per stage at (pp, dp, tp) = (2, 2, 1); resume bit-identically at the same
    degrees; reshard to (2, 1, 2) and (1, 2, 2) with g-SNR and scales kept."""
    import torch

    results = run_ranks(parallel3d_ranks.checkpoints, 4, str(tmp_path / "ckpt"), timeout=500)
    for out in results:
        first = out["first"]
        same = out[(2, 2, 1)]
        assert set(same["params"]) == set(first["params"])
        for name, p in first["params"].items():
            assert torch.equal(same["params"][name], p), name  # bit-identical resume
        for degrees in ((2, 2, 1), (2, 1, 2), (1, 2, 2)):
            run = out[degrees]
            assert run["step_counts"] == [{}] * (
                parallel3d_ranks.STEPS - parallel3d_ranks.SAVE_AT
            )  # loaded g-SNR: no collective
            assert run["loaded_table"] == run["table"]
            for name, row in run["table"].items():
                assert row == first["whole_table"][name], (degrees, name)  # kept exactly
        check([out[(2, 1, 2)], out[(1, 2, 2)]], ref, {})
