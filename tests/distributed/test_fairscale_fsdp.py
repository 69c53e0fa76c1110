"""fairscale FullyShardedDataParallel (0.4.13): the flat-parameter layout.

fairscale's FSDP needs CUDA, so on CPU the metadata mapping is tested with fairscale's own
FlatParameter metadata and shard arithmetic on synthetic units (see
tests/distributed/fairscale_fsdp_ranks.py), at 2 and 3 ranks with gloo, against the single-process
run; the real wrapper runs where at least two CUDA devices exist (NCCL cannot put two
ranks on one GPU, and gloo has no reduce-scatter for fairscale's CUDA tensors)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.distributed import fairscale_fsdp_ranks, fsdp1_ranks, fsdp2_ranks
from tests.support.compare import PARAM_RTOL, TABLE_RTOL, max_param_error, max_table_error
from tests.support.ranks import run_ranks

pytest.importorskip("fairscale")


@pytest.fixture(scope="module")
def ref() -> dict[Any, Any]:
    return fsdp1_ranks.reference_single_group()


def test_shard_range_matches_fairscale_get_shard():
    """The range the layout reads as real elements is exactly what fairscale's
    ``_get_shard`` puts in each rank's shard, and the rest of the shard is padding."""
    from fairscale.nn.data_parallel.fully_sharded_data_parallel import FullyShardedDataParallel

    from sai_dist.layouts.flat_param import fairscale_shard_range

    for numel in (1, 2, 3, 5, 7, 12, 13, 64, 101):
        full = torch.arange(1, numel + 1, dtype=torch.float32)
        for world in (2, 3, 4, 8):
            covered = []
            for rank in range(world):
                shard, padded = FullyShardedDataParallel._get_shard(
                    SimpleNamespace(rank=rank, world_size=world), full
                )
                lo, hi, local = fairscale_shard_range(numel, rank, world)
                assert shard.numel() == local and padded == local - (hi - lo)
                assert torch.equal(shard[: hi - lo], full[lo:hi])
                assert not shard[hi - lo :].any()  # zero padding, never a real element
                covered.extend(range(lo, hi))
            assert covered == list(range(numel))


def check(results: list[dict[str, Any]], key: str, ref: dict[Any, Any]) -> None:
    numel = sum(p.numel() for p in fsdp2_ranks.make_model().parameters())
    for rank, res in enumerate(results):
        run = res[key]
        param_err = max_param_error(run["params"], ref[fsdp2_ranks.STEPS])
        table_err = max_table_error(run["table"], ref["table"])
        print(
            f"fairscale FSDP {key} world={len(results)} rank={rank}: "
            f"params {param_err:.2e}, table {table_err:.2e}"
        )
        assert param_err < PARAM_RTOL
        assert table_err < TABLE_RTOL
    assert sum(r[key]["held_elements"] for r in results) == numel


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_synthetic_units_against_single_process(world, ref):
    results = run_ranks(fairscale_fsdp_ranks.launch, world, timeout=300)
    check(results, "flat", ref)
    check(results, "each", ref)
    # Per-parameter shards carry padding at 2 and 3 ranks (odd sizes; the (2,) temperature at
    # 3 ranks), the flat one at 2 (2,649 elements); the layout leaves it out.
    assert sum(r["each"]["padding"] for r in results) > 0
    if world == 2:
        assert sum(r["flat"]["padding"] for r in results) > 0


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="fairscale FSDP needs CUDA, and two ranks need two GPUs (NCCL refuses two ranks on one device)",
)
def test_real_fairscale_fsdp_2_gpus(ref):
    results = run_ranks(fairscale_fsdp_ranks.launch_real, 2, timeout=400)
    for key in ("flat", "each"):
        for res in results:
            assert max_param_error(res[key]["params"], ref[fsdp2_ranks.STEPS]) < PARAM_RTOL
            assert max_table_error(res[key]["table"], ref["table"]) < TABLE_RTOL
