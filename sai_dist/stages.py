"""How a model's blocks split into pipeline stages: one rule for the job's stages
(:mod:`sai_dist.train.parallel3d`) and the accounting's busiest stage
(:mod:`sai_dist.memory.parallel`), so the two always agree."""

from __future__ import annotations


def stage_blocks(n_blocks: int, pp: int) -> list[range]:
    """Block indices of each of ``pp`` stages: contiguous, as even as possible, earlier
    stages taking the extra block (stage ``s`` gets ``n // pp + (s < n % pp)`` blocks).

    The ranges cover ``0..n-1`` once, in order; none is empty. What sits outside the block
    list (embeddings before it, the final norm and head after it) goes to the first and
    last stage and is not counted in the balance."""
    if pp < 1 or n_blocks < pp:
        raise ValueError(
            f"--pp {pp}: cannot split {n_blocks} blocks into {pp} non-empty pipeline stages; "
            f"use --pp <= {n_blocks}"
        )
    base, extra = divmod(n_blocks, pp)
    out, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out
