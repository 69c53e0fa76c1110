"""Rank functions for the statistics-engine tests (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sai_dist.stats import Piece, reduce_block_moments


def make_blocks(seed: int) -> list[torch.Tensor]:
    """Blocks with the awkward cases: a 1-element block, a block with |mean| = 1e4 * std,
    a constant block, a large one, and ordinary ones."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [
        torch.randn(37, generator=gen),
        torch.randn(1, generator=gen),
        1e4 + torch.randn(5000, generator=gen),  # |mean| = 1e4 * std
        torch.full((9,), 2.5),
        torch.randn(300, 7, generator=gen) * 1e-3,
        torch.randn(2, generator=gen),
    ]
    return [b.float() for b in blocks]


def random_split(
    blocks: list[torch.Tensor], world: int, seed: int
) -> list[list[tuple[torch.Tensor, list[Piece]]]]:
    """Cut every block into contiguous runs at random points (empty runs included) and deal
    them to ranks; each rank gets a flat buffer per block it holds, padded at the end."""
    gen = torch.Generator().manual_seed(seed)
    per_rank: list[list[tuple[torch.Tensor, list[Piece]]]] = [[] for _ in range(world)]
    for b, block in enumerate(blocks):
        flat = block.reshape(-1)
        cuts = sorted(torch.randint(0, flat.numel() + 1, (world - 1,), generator=gen).tolist())
        bounds = [0, *cuts, flat.numel()]
        for r in range(world):
            seg = flat[bounds[r] : bounds[r + 1]]
            pad = int(torch.randint(0, 3, (), generator=gen))
            # padding is garbage that must never count
            buf = torch.cat([seg, torch.full((pad,), 1e9)])
            per_rank[r].append((buf, [Piece(b, (0, seg.numel()))]))
    return per_rank


def moments_on_rank(rank: int, world: int, seed: int) -> dict:
    blocks = make_blocks(seed)
    mine = random_split(blocks, world, seed)[rank]
    # A replicated block: every rank holds all of it, only rank 0 counts it.
    replicated = torch.randn(50, generator=torch.Generator().manual_seed(seed + 1))
    mine.append((replicated, [Piece(len(blocks), None, counted=rank == 0)]))
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        m = reduce_block_moments(mine, len(blocks) + 1, dist.group.WORLD)
    finally:
        dist.all_reduce = original
    return {"norm": m.norm, "std": m.std, "count": m.count, "collectives": len(calls)}
