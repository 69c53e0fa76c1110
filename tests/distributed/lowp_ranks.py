"""Rank functions for the FSDP2 tests of low-precision state (tests/distributed/test_momentum_fsdp2.py).

Every rank trains on the *same* full batch, so FSDP2's averaged gradient of identical
summands is exactly the single-process gradient ((g + g) / 2 is exact): what differs from
the single-process run is only how SGD-SaI's state is laid out, which is what is tested.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import sai_dist
from sai_dist.names import unwrapped_name

SEED = 21


def make_model(shapes: tuple[tuple[int, int], ...], dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(i, o, bias=True) for i, o in shapes]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())][:-1]).to(dtype)


def batch(step: int, width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(16, width, generator=g).to(dtype), torch.randn(16, generator=g).to(dtype)


def state_of(model: nn.Module, opt: sai_dist.SGDSaI) -> dict[str, Any]:
    """Full parameters and, per parameter, the decoded momentum with its quantization step
    per element (all-gathered: collective under FSDP2)."""
    from sai_dist import momentum as lowp

    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        st = opt.state[p]
        buf = st["momentum_buffer"]
        local = buf.to_local() if hasattr(buf, "to_local") else buf
        m = lowp.decode(local.reshape(-1), st.get("momentum_scale"))
        step = (
            st["momentum_scale"].repeat_interleave(lowp.BLOCK)[: m.numel()]
            if "momentum_scale" in st
            else torch.zeros_like(m)
        )
        out[unwrapped_name(model, name)] = {
            "param": full.detach().float().clone(),
            "momentum": m.clone(),
            "step": step.clone(),
            "dtype": str(local.dtype),
            "bytes": sum(
                (t.to_local() if hasattr(t, "to_local") else t).numel()
                * (t.to_local() if hasattr(t, "to_local") else t).element_size()
                for k, t in st.items()
                if k in ("momentum_buffer", "momentum_scale")
            ),
            "local_numel": local.numel(),
        }
    return out


def run(
    rank: int | None,
    world: int | None,
    shapes: tuple[tuple[int, int], ...],
    dtype: torch.dtype,
    momentum_dtype: str,
    steps: int,
) -> dict[str, Any]:
    """``steps`` steps of SGDSaI; sharded with FSDP2 when ``rank`` is given."""
    model = make_model(shapes, dtype)
    if rank is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = sai_dist.SGDSaI(model.parameters(), lr=0.05, momentum=0.9, momentum_dtype=momentum_dtype, seed=SEED)
    for step in range(steps):
        x, y = batch(step, shapes[0][0], dtype)
        out = model(x)
        ((out.float().mean(-1) - y.float()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return state_of(model, opt)


def fsdp2(rank: int, world: int, *args: Any) -> dict[str, Any]:
    return run(rank, world, *args)


def oss(rank: int, world: int, shapes, dtype, momentum_dtype, steps) -> dict[str, Any]:
    """fairscale ``OSS(optim=SGDSaI, momentum_dtype=...)`` under DDP, every rank on the
    same full batch: each rank steps the parameters it owns, whole."""
    from fairscale.optim import OSS
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sai_dist.fairscale  # hooks OSS so its SGDSaI gets the layout

    model = make_model(shapes, dtype)
    opt = OSS(
        model.parameters(),
        optim=sai_dist.SGDSaI,
        lr=0.05,
        momentum=0.9,
        momentum_dtype=momentum_dtype,
        seed=SEED,
    )
    wrapped = DDP(model)
    for step in range(steps):
        x, y = batch(step, shapes[0][0], dtype)
        ((wrapped(x).float().mean(-1) - y.float()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    inner = opt.optim
    owned = {unwrapped_name(model, n): p for n, p in model.named_parameters() if p in inner.state}
    return {
        "params": {unwrapped_name(model, n): p.detach().float().clone() for n, p in model.named_parameters()},
        "owned": {n: str(inner.state[p]["momentum_buffer"].dtype) for n, p in owned.items()},
    }
