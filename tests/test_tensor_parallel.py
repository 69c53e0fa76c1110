"""Tensor parallel (torch ``parallelize_module``) alone and under FSDP2, against the
single-process SGDSaI run on the same global batches.

TP only (2 ranks) leaves norms, embedding and head plain tensors next to ``Shard(0)``,
``Shard(1)`` and ``Replicate`` DTensors on the ``tp`` mesh; FSDP2 x TP (4 ranks) puts the
TP'd linears on the 2-D ``(dp, tp)`` mesh (``_StridedShard`` from FSDP2-over-TP) and the
rest on ``dp`` alone: one optimizer over DTensors on two meshes of one root. Either way
step 1 is three collectives (the cross-rank check and one per statistics pass), later
steps none.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests import parallel3d_ranks as R
from tests.distributed import run_ranks

pytestmark = pytest.mark.distributed

PARAM_RTOL = 1e-5
GSNR_RTOL = 1e-6


@pytest.fixture(scope="module")
def ref() -> dict[str, Any]:
    return R.reference()


def check(results: list[dict[str, Any]], ref: dict[str, Any], step1: dict[str, int]) -> tuple[float, float]:
    """Every rank's parameters and g-SNR table against the reference; step collectives."""
    param_err = table_err = 0.0
    for out in results:
        if step1:
            assert out["step_counts"][0] == step1, out["coord"]
            assert out["step_counts"][1:] == [{}] * (R.STEPS - 1), out["coord"]
        assert out["params"], out["coord"]
        for name, got in out["params"].items():
            want = ref["params"][name]
            assert got.shape == want.shape, name
            param_err = max(param_err, float((got - want).abs().max() / want.abs().max()))
        assert list(out["table"]) == [n for n in ref["table"] if n in out["params"]]
        for name, row in out["table"].items():
            assert row["numel"] == ref["table"][name]["numel"], name
            for key in ("gsnr", "scale"):
                want = ref["table"][name][key]
                table_err = max(table_err, abs(row[key] - want) / abs(want))
    print(f"{len(results)} ranks: params rel err {param_err:.2e}, g-SNR/scale rel err {table_err:.2e}")
    assert param_err <= PARAM_RTOL
    assert table_err <= GSNR_RTOL
    return param_err, table_err


def test_tensor_parallel_2_ranks(ref):
    results = run_ranks(R.launch, 2, 1, 1, 2, timeout=300)
    placements = results[0]["placements"]
    assert placements["layers.0.q.weight"] == "(Shard(dim=0),)"
    assert placements["layers.0.o.weight"] == "(Shard(dim=1),)"
    assert placements["layers.0.w2.bias"] == "(Replicate(),)"
    assert placements["layers.0.norm1.weight"] == "plain"
    check(results, ref, {"dist.all_reduce": 3})


def test_fsdp2_x_tensor_parallel_4_ranks(ref):
    results = run_ranks(R.launch, 4, 1, 2, 2, timeout=400)
    placements = results[0]["placements"]
    assert placements["layers.0.q.weight"].startswith("(_StridedShard(dim=0")
    assert placements["layers.0.w2.bias"] == "(Shard(dim=0), Replicate())"
    assert placements["layers.0.norm1.weight"] == "(Shard(dim=0),)"  # the dp mesh alone
    check(results, ref, {"dist.all_reduce": 3})
