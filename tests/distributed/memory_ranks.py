"""Rank-side code for the measured memory tests (spawned by tests/support/ranks.py::run_ranks).

Each function builds a small real model, trains two steps under a wrapper, and returns the
bytes of optimizer state this rank actually holds, read from the optimizer's own state
(local shards of DTensors), with the shapes needed for the accounting's prediction.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.paths import REPO

ROOT = REPO
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))

#: Buffers of the parameters' size per optimizer, by state key.
STATE_KEYS = {
    "sgd_sai": ("momentum_buffer",),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "sgd_momentum": ("momentum_buffer",),
}


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for ``t`` (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(optimizer: torch.optim.Optimizer, kind: str) -> int:
    keys = STATE_KEYS[kind]
    return sum(local_bytes(v) for st in optimizer.state.values() for k, v in st.items() if k in keys)


def tiny_gpt() -> nn.Module:
    """A real GPT (the accounting's own architecture) with awkward dim-0 sizes: vocab 11
    and positions 5 do not split evenly over 2 ranks, LayerNorm weights have 6 rows."""
    from sai_dist.memory.models import NanoGPT, NanoGPTConfig

    torch.manual_seed(0)
    return NanoGPT(NanoGPTConfig(n_layer=2, n_head=2, n_embd=6, vocab_size=11, block_size=5, bias=True))


def make_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd_sai":
        from sai_dist import SGDSaI

        return SGDSaI(params, lr=0.01)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.01)
    if kind == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    raise ValueError(kind)


def _tokens(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randint(0, 11, (2, 5), generator=g), torch.randint(0, 11, (2, 5), generator=g)


def fsdp2_state(rank: int, world: int, kind: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_gpt()
    shapes = [tuple(p.shape) for p in model.parameters()]
    mesh = init_device_mesh("cpu", (world,))
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(kind, model.parameters())
    for step in range(2):
        x, y = _tokens(step, rank)
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    local_param = sum(local_bytes(p) for p in model.parameters())
    return dict(rank=rank, shapes=shapes, state=state_bytes(opt, kind), local_param_bytes=local_param)


def _ds_model() -> nn.Module:
    # 79 elements in six tensors: neither the flat total nor most tensors split evenly at 2.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def zero_state(rank: int, world: int, stage: int, kind: str, precision: str = "fp32") -> dict[str, Any]:
    """Train two steps under DeepSpeed ZeRO-``stage`` (one param group, ``fp32`` or
    ``bf16-mixed``) and read the state of the optimizer DeepSpeed steps on this rank's
    flat partition, and the bytes of its fp32 master partition."""
    import deepspeed

    model = _ds_model()
    shapes = [tuple(p.shape) for p in model.parameters()]
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    bf16 = precision == "bf16-mixed"
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if kind == "sgd_sai":
        import sai_dist.deepspeed as sds

        cfg["optimizer"] = {"type": "SGDSaI", "params": {"lr": 0.01}}
        engine, _, _, _ = sds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        client = make_optimizer(kind, model.parameters())
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=cfg)
    for step in range(2):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(2, 7, generator=g), torch.randn(2, 3, generator=g)
        if bf16:
            x = x.to(torch.bfloat16)
        loss = F.mse_loss(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
    wrapper = engine.optimizer
    inner = wrapper.optimizer
    if stage in (1, 2):
        master = sum(t.numel() * t.element_size() for t in wrapper.single_partition_of_fp32_groups)
    else:
        master = sum(
            t.numel() * t.element_size()
            for t in wrapper.fp32_partitioned_groups_flat
            if all(t.data_ptr() != f.data_ptr() for f in wrapper.fp16_partitioned_groups_flat)
        )
    return dict(rank=rank, shapes=shapes, state=state_bytes(inner, kind), master=master)
