"""The job's 3-D layout arithmetic: validation of (pp, dp, tp) degrees and the split of the
GPT's blocks into pipeline stages.

Pure functions with no process group, so every rank computes the same answer from the same
config before anything starts (a refusal here happens on every rank, before any collective, so
it cannot hang). Not yet wired into ``sai-dist train``: this is the first step of issue 15
item 6 (see the i15j report).

Layout (the torchtitan arrangement): ``world = pp * dp * tp`` with mesh dims
``("pp", "dp", "tp")``; FSDP2 shards over ``dp``, tensor parallel splits within ``tp``, and
pipeline stage ``s`` holds blocks ``stage_blocks(n_layers, pp)[s]``; stage 0 also holds the
embeddings, the last stage ``ln_f`` and the head.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Degrees:
    """``pp * dp * tp == world``; ``dp`` is what is left for FSDP2 after TP and PP."""

    pp: int
    dp: int
    tp: int


def check_degrees(world_size: int, tp: int, pp: int, n_heads: int, n_layers: int) -> Degrees:
    """Validate ``--tp``/``--pp`` against the world and the model; return the three degrees.

    Conditions (each refusal names the flag and the fix):
    * ``tp >= 1``, ``pp >= 1``;
    * ``world_size % (tp * pp) == 0`` (the data-parallel degree ``world / (tp * pp)`` is whole);
    * ``n_heads % tp == 0`` (column-wise q/k/v keeps whole heads on each TP rank);
    * ``n_layers >= pp`` (every stage holds at least one block).
    """
    for flag, value in (("--tp", tp), ("--pp", pp), ("world size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by --tp {tp} x --pp {pp} = {tp * pp}: "
            f"launch a multiple of {tp * pp} ranks or lower --tp/--pp"
        )
    if n_heads % tp:
        raise ValueError(
            f"--n-heads {n_heads} is not divisible by --tp {tp}: tensor parallel splits attention by "
            "whole heads; choose --tp dividing --n-heads"
        )
    if n_layers < pp:
        raise ValueError(
            f"--n-layers {n_layers} is fewer than --pp {pp} stages: every stage needs at least one "
            "block; lower --pp or raise --n-layers"
        )
    return Degrees(pp=pp, dp=world_size // (tp * pp), tp=tp)


def stage_blocks(n_layers: int, pp: int) -> list[range]:
    """Contiguous block ranges per stage, as even as possible: stage ``s`` gets
    ``n_layers // pp`` blocks plus one if ``s < n_layers % pp``. The embeddings (stage 0) and
    ``ln_f`` + head (last stage) are not counted in the balance. The ranges cover
    ``0..n_layers-1`` once, in order, and none is empty."""
    if pp < 1 or n_layers < pp:
        raise ValueError(f"cannot split {n_layers} blocks into {pp} non-empty stages")
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out
