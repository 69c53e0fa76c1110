"""What the cross-rank consistency check costs at step 1.

On N local gloo ranks (127.0.0.1), for a model of ``B`` blocks of 64x64 in two param
groups: the fingerprint alone (building the fields and their digests, no collective), the
whole check (fingerprint + one all_reduce of 16 int64), and, for scale, the statistics
engine's two passes; then the full ``SGDSaI.step()`` at step 1 with ``check_ranks`` on and
off, for a replicated (DDP-like) and a sharded (DTensor, 1-D mesh) layout.

    python benchmarks/consistency_check.py [--world 2] [--blocks 146]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sai_dist import SGDSaI
from sai_dist.consistency import check_ranks, step_fingerprint
from sai_dist.stats import reduce_block_moments
from tests.support.ranks import run_ranks


def _median_ms(fn: Any, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _params(blocks: int, sharded: bool) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    wholes = [torch.randn(64, 64, generator=g) for _ in range(blocks)]
    if not sharded:
        return [nn.Parameter(w) for w in wholes]
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return [nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in wholes]


def _step1_ms(params: list[nn.Parameter], check: bool, repeats: int = 10) -> float:
    """Median time of a step 1 (a fresh optimizer each time, so each step fixes g-SNR)."""
    for p in params:
        p.grad = torch.ones_like(p) * 1.5
    times = []
    for _ in range(repeats + 1):
        half = len(params) // 2
        opt = SGDSaI(
            [{"params": params[:half]}, {"params": params[half:], "weight_decay": 0.0}], check_ranks=check
        )
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def _rank(rank: int, world: int, blocks: int) -> dict[str, float]:
    out: dict[str, float] = {}
    params = _params(blocks, sharded=False)
    g = torch.Generator().manual_seed(1)  # the same gradient on every rank, as after DDP
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = SGDSaI([{"params": params[: blocks // 2]}, {"params": params[blocks // 2 :]}])
    moments = reduce_block_moments(opt.layout.sources(params), blocks, None)
    options = {"normalize": opt.normalize, "degenerate": opt.degenerate}
    out["fingerprint_ms"] = _median_ms(
        lambda: step_fingerprint(opt.layout, opt.param_groups, options, None, moments)
    )
    out["check_ms"] = _median_ms(
        lambda: check_ranks(
            dist.group.WORLD,
            step_fingerprint(opt.layout, opt.param_groups, options, None, moments),
            refusal=None,
            when="bench",
        )
    )
    out["engine_ms"] = _median_ms(
        lambda: reduce_block_moments(opt.layout.sources(params), blocks, dist.group.WORLD)
    )
    for kind in ("replicated", "sharded"):
        ps = _params(blocks, sharded=kind == "sharded")
        out[f"{kind}_on_ms"] = _step1_ms(ps, True)
        out[f"{kind}_off_ms"] = _step1_ms(ps, False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=146)
    args = parser.parse_args()
    r = run_ranks(_rank, args.world, args.blocks)[0]
    print(
        f"{args.world} gloo ranks, {args.blocks} blocks of 64x64: fingerprint {r['fingerprint_ms']:.2f} ms, "
        f"check (+ 1 all_reduce) {r['check_ms']:.2f} ms, statistics engine {r['engine_ms']:.2f} ms"
    )
    for kind in ("replicated", "sharded"):
        print(
            f"step 1, {kind}: check_ranks=True {r[f'{kind}_on_ms']:.1f} ms, "
            f"check_ranks=False {r[f'{kind}_off_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
