"""Why the statistics engine issues one collective per pass: per-tensor all-reduces are
latency-bound.

Times, on N local gloo ranks (127.0.0.1), ``B`` separate all-reduces of one block's three
float64 moments against a single all-reduce of the ``[B, 3]`` table, and the engine's full
step-1 statistics (two passes) for ``B`` blocks.

    python benchmarks/batched_reduction.py [--world 2] [--blocks 146]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from sai_dist.stats import Piece, reduce_block_moments
from tests.support.ranks import run_ranks


def _time(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank(rank: int, world: int, blocks: int) -> dict[str, float]:
    rows = [torch.zeros(3, dtype=torch.float64) for _ in range(blocks)]
    table = torch.zeros(blocks, 3, dtype=torch.float64)

    def separate() -> None:
        for r in rows:
            dist.all_reduce(r)

    grads = [torch.randn(64, 64) for _ in range(blocks)]
    sources = [(g, [Piece(i)]) for i, g in enumerate(grads)]
    return {
        "separate_ms": _time(separate) * 1e3,
        "batched_ms": _time(lambda: dist.all_reduce(table)) * 1e3,
        "engine_ms": _time(lambda: reduce_block_moments(sources, blocks, dist.group.WORLD)) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=146)
    args = parser.parse_args()
    r = run_ranks(_rank, args.world, args.blocks)[0]
    print(
        f"{args.world} gloo ranks, {args.blocks} blocks: {args.blocks} separate all-reduces "
        f"{r['separate_ms']:.2f} ms, one batched all-reduce {r['batched_ms']:.3f} ms, "
        f"engine (2 passes, 64x64 blocks) {r['engine_ms']:.2f} ms"
    )


if __name__ == "__main__":
    main()
