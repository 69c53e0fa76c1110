"""How a world splits into (pp, dp, tp) and a model's blocks into pipeline stages: one rule
for the job's stages (:mod:`sai_dist.train.parallel3d`) and the accounting's busiest stage
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


def data_parallel_degree(world_size: int, tp: int, pp: int, *, world: str, fix: str) -> int:
    """``world_size / (tp * pp)``, the degree left for data parallel; ``ValueError`` naming
    the setting when a degree is not an integer >= 1 or ``tp * pp`` does not divide the
    world. ``world``: how the caller's user names the world size (a flag, or "world size");
    ``fix``: what to do when it does not divide, ``{n}`` standing for ``tp * pp``."""
    for flag, value in (("--tp", tp), ("--pp", pp), (world, world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    n = tp * pp
    if world_size % n:
        raise ValueError(
            f"{world} {world_size} is not divisible by --tp {tp} x --pp {pp} = {n}: {fix.format(n=n)}"
        )
    return world_size // n
