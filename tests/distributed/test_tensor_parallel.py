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

from tests.distributed import parallel3d_ranks
from tests.distributed.parallel3d_checks import check
from tests.support.ranks import run_ranks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ref() -> dict[str, Any]:
    return parallel3d_ranks.reference()


def test_tensor_parallel_2_ranks(ref):
    results = run_ranks(parallel3d_ranks.launch, 2, 1, 1, 2, timeout=300)
    placements = results[0]["placements"]
    assert placements["layers.0.q.weight"] == "(Shard(dim=0),)"
    assert placements["layers.0.o.weight"] == "(Shard(dim=1),)"
    assert placements["layers.0.w2.bias"] == "(Replicate(),)"
    assert placements["layers.0.norm1.weight"] == "plain"
    check(results, ref, {"dist.all_reduce": 3})


def test_fsdp2_x_tensor_parallel_4_ranks(ref):
    results = run_ranks(parallel3d_ranks.launch, 4, 1, 2, 2, timeout=400)
    placements = results[0]["placements"]
    assert placements["layers.0.q.weight"].startswith("(_StridedShard(dim=0")
    assert placements["layers.0.w2.bias"] == "(Shard(dim=0), Replicate())"
    assert placements["layers.0.norm1.weight"] == "(Shard(dim=0),)"  # the dp mesh alone
    check(results, ref, {"dist.all_reduce": 3})
