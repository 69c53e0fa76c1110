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


# -- DCP resharding 4 -> 2 -> 1 of every momentum_dtype (test_momentum_fsdp2.py) -------------

#: 8192-element first weight: its int8 blocks fall on the same boundaries at 4, 2 and 1
#: ranks (the runs match: codes and scales load bit for bit); 12800-element second weight:
#: 3200 per rank at 4 ranks, 6400 at 2, so every reshard moves its block boundaries (the
#: codes are re-encoded); the rest stays float32 (under SMALL).
RESHARD = ((64, 128), (128, 100), (100, 8))
MOMENTUM_DTYPES = ("float32", "bfloat16", "int8")
SAVE_AT, RESUME_AT, STEPS = 3, 5, 7


def build(rank: int | None, momentum_dtype: str, hsdp: bool = False) -> tuple[nn.Module, sai_dist.SGDSaI]:
    """The RESHARD model (FSDP2 on every Linear and the root when ``rank`` is given, HSDP
    2 x 2 with ``hsdp``) and its SGDSaI."""
    model = make_model(RESHARD, torch.float32)
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        world = torch.distributed.get_world_size()
        if hsdp:
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = sai_dist.SGDSaI(model.parameters(), lr=0.05, momentum=0.9, momentum_dtype=momentum_dtype, seed=SEED)
    return model, opt


def train(model: nn.Module, opt: sai_dist.SGDSaI, start: int, stop: int) -> list[float]:
    """Steps ``start .. stop`` on the same full batch on every rank; the losses."""
    losses = []
    for step in range(start, stop):
        x, y = batch(step, RESHARD[0][0], torch.float32)
        loss = ((model(x) - y[:, None]) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def local_momentum(model: nn.Module, opt: sai_dist.SGDSaI) -> dict[str, Any]:
    """Per parameter, this rank's momentum as stored: its original-element offset, the
    decoded float32 value, the storage dtype, and for int8 the codes and block scales."""
    from sai_dist import momentum as lowp

    out = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        local = opt.layout.local(st["momentum_buffer"]).reshape(-1)
        scales = st.get("momentum_scale")
        out[unwrapped_name(model, name)] = {
            "offset": opt.layout.element_origin(p)[0].offset,
            "numel": p.numel(),
            "dtype": str(local.dtype),
            "value": lowp.decode(local, scales).clone(),
            "codes": local.clone() if local.dtype == torch.int8 else None,
            "scales": None if scales is None else scales.clone(),
        }
    return out


def reshard_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """4 ranks: SAVE_AT steps of each momentum_dtype under FSDP2 (and of int8 under HSDP
    2 x 2), saved to ``root/<dtype>``; the losses and the saved momentum."""
    from sai_dist import checkpoint

    out = {}
    for md, hsdp in [(md, False) for md in MOMENTUM_DTYPES] + [("int8", True)]:
        key = md + ("-hsdp" if hsdp else "")
        model, opt = build(rank, md, hsdp)
        losses = train(model, opt, 0, SAVE_AT)
        checkpoint.save(f"{root}/{key}", model, opt)
        out[key] = {"losses": losses, "saved": local_momentum(model, opt)}
    return out


def reshard_resume(rank: int, world: int, root: str) -> dict[str, Any]:
    """2 ranks: load each 4-rank checkpoint (the momentum as loaded), train to RESUME_AT,
    save to ``root/<dtype>-2``; and load the int8 HSDP one (no steps)."""
    from sai_dist import checkpoint

    out: dict[str, Any] = {}
    for md in MOMENTUM_DTYPES:
        model, opt = build(rank, md)
        checkpoint.load(f"{root}/{md}", model, opt)
        loaded = local_momentum(model, opt)
        losses = train(model, opt, SAVE_AT, RESUME_AT)
        checkpoint.save(f"{root}/{md}-2", model, opt)
        out[md] = {"loaded": loaded, "losses": losses, "saved": local_momentum(model, opt)}
        if md == "int8":  # same mesh: a fresh optimizer resumes bit for bit
            again, again_opt = build(rank, md)
            checkpoint.load(f"{root}/{md}-2", again, again_opt)
            out[md]["reloaded"] = local_momentum(again, again_opt)
            a = train(model, opt, RESUME_AT, STEPS)
            b = train(again, again_opt, RESUME_AT, STEPS)
            same = all(
                torch.equal(p.to_local(), q.to_local())
                for p, q in zip(model.parameters(), again.parameters(), strict=True)
            )
            out[md]["same_mesh_resume"] = {"losses": (a, b), "params_equal": same}
    model, opt = build(rank, "int8")
    checkpoint.load(f"{root}/int8-hsdp", model, opt)
    out["int8-hsdp"] = {"loaded": local_momentum(model, opt)}
    return out
