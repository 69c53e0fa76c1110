"""Rank function for tests/unit/test_fused.py: the fused step on FSDP2 local shards."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from sai_dist import SGDSaI, native
from tests.support.collectives import CollectiveCounter


def fused_vs_foreach_on_shards(rank: int, world: int) -> dict[str, Any]:
    """Two copies of one sharded model, stepped with ``fused=None`` and ``fused=False`` on
    identical gradients: the largest relative difference of the local shards, whether the
    fused run stepped the shards in place through the native kernel, and the collectives
    its first and a later step issued."""
    torch.manual_seed(0)
    # Shapes chosen to shard unevenly over 2 ranks, one of them to an empty shard.
    base = nn.Sequential(
        nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 1), nn.Tanh(), nn.Linear(1, 3), nn.LayerNorm(3)
    )
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    for m in models:
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(m)
    fast = SGDSaI(models[0].parameters(), lr=0.1, weight_decay=0.01, momentum=0.9, fused=None)
    slow = SGDSaI(models[1].parameters(), lr=0.1, weight_decay=0.01, momentum=0.9, fused=False)
    calls = {"native": 0}
    original = native.step

    def spy(*args: Any, **kwargs: Any) -> None:
        calls["native"] += 1
        return original(*args, **kwargs)

    native.step = spy  # type: ignore[assignment]
    ptrs_before = [p.to_local().data_ptr() for p in models[0].parameters()]
    collectives = []
    try:
        for step in range(5):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * step + rank))
            for m in models:
                (m(x) * torch.arange(3.0)).square().mean().backward()
            # Same gradients into both (the backward already made them identical).
            with CollectiveCounter() as counter:
                fast.step()
            collectives.append(counter.total)
            slow.step()
            for m in models:
                m.zero_grad(set_to_none=True)
    finally:
        native.step = original  # type: ignore[assignment]
    worst = 0.0
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert isinstance(a, DTensor)
        la, lb = a.to_local(), b.to_local()
        if la.numel():
            worst = max(
                worst, float((la - lb).detach().abs().max() / lb.detach().abs().max().clamp_min(1e-12))
            )
    return {
        "worst": worst,
        "native_calls": calls["native"],
        "in_place": ptrs_before == [p.to_local().data_ptr() for p in models[0].parameters()],
        "collectives": collectives,
        "native_available": native.library() is not None,
    }
