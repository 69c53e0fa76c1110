"""Wrap the model for a backend and build the optimizer over what the wrapper exposes.

========  ===========================================================================
backend   what happens
========  ===========================================================================
single    the plain model on one device (no process group needed)
ddp       ``DistributedDataParallel``: full replicas, gradients all-reduced
fsdp2     ``fully_shard`` on every transformer block, then on the root: parameters,
          gradients and optimizer state are DTensor shards over all ranks
hsdp      ``fully_shard`` on a 2-D mesh ``(replicate, shard)``: sharded within a shard
          group, replicated across groups
deepspeed ``sai_dist.deepspeed.initialize`` (mirrors ``deepspeed.initialize``) with a ZeRO
          config from ``configs/``
========  ===========================================================================

With ``--tp``/``--pp`` > 1 (fsdp2 only) the model is built by
:func:`sai_dist.train.parallel3d.build`: tensor parallel, pipeline stages and FSDP2 on one
``(pp, dp, tp)`` mesh.

The optimizer is always built *after* wrapping, from the tensors the wrapper gives it,
exactly as a user would: ``SGDSaI(model.parameters())`` picks its layout by itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from sai_dist.optimizer import SGDSaI
from sai_dist.train.config import TrainConfig
from sai_dist.train.model import GPT


@dataclass
class Setup:
    """What the loop drives: ``model`` to call, ``optimizer`` to step, and for DeepSpeed the
    ``engine`` (which then owns backward and step)."""

    model: nn.Module
    optimizer: Any
    engine: Any | None = None
    # --tp/--pp runs: this rank's mesh coordinates and pipeline schedule
    # (sai_dist.train.parallel3d.Parallel); None otherwise.
    parallel: Any | None = None


def param_groups(named: Iterable[tuple[str, Tensor]], weight_decay: float) -> list[dict[str, Any]]:
    """Decay on matrices (linear and embedding weights), none on biases and norm gains: the
    usual GPT recipe, the same for every optimizer."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    cfg: TrainConfig, named: Iterable[tuple[str, Tensor]], sgdsai_extra: dict[str, Any] | None = None
) -> Optimizer:
    """The optimizer ``cfg`` names over ``named``; ``sgdsai_extra``: more SGDSaI arguments
    (a pipeline stage's ``pipeline_group``), ignored by the others."""
    groups = param_groups(named, cfg.weight_decay)
    lr = cfg.learning_rate
    if cfg.optimizer == "sgdsai":
        return SGDSaI(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            momentum_dtype=cfg.momentum_dtype,
            **(sgdsai_extra or {}),
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of 0-based step ``step``: linear warm-up, then cosine decay to
    ``min_lr_ratio`` of the peak at the last step. A pure function of the step, so a resumed
    run needs no scheduler state."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def hsdp_mesh_shape(cfg: TrainConfig, world_size: int, local_world_size: int) -> tuple[int, int]:
    """``(replicate, shard)``: the shard group is a node by default; on a single node, half
    the ranks, so both dimensions are exercised."""
    shard = cfg.hsdp_shard_size
    if shard is None:
        shard = local_world_size if local_world_size < world_size else max(1, world_size // 2)
    if shard < 1 or world_size % shard:
        raise ValueError(f"--hsdp-shard-size {shard} must divide the world size {world_size}")
    return world_size // shard, shard


def build(cfg: TrainConfig, model: GPT, device: torch.device, local_world_size: int) -> Setup:
    """Move ``model`` to ``device``, wrap it for ``cfg.backend`` and build the optimizer."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.backend != "single" and not dist.is_initialized():
        raise RuntimeError(f"--backend {cfg.backend} needs a process group; none was set up")
    if cfg.backend == "single" and world > 1:
        raise ValueError(f"--backend single cannot run on {world} ranks; use ddp, fsdp2, hsdp or deepspeed")
    if cfg.parallel3d:
        from sai_dist.train import parallel3d

        stage, parallel, extra = parallel3d.build(cfg, model, device)
        return Setup(stage, make_optimizer(cfg, stage.named_parameters(), extra), parallel=parallel)
    model.to(device)
    if cfg.backend == "single":
        return Setup(model, make_optimizer(cfg, model.named_parameters()))
    if cfg.backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return Setup(ddp, make_optimizer(cfg, model.named_parameters()))
    if cfg.backend in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if cfg.backend == "fsdp2":
            mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
        else:
            shape = hsdp_mesh_shape(cfg, world, local_world_size)
            mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return Setup(model, make_optimizer(cfg, model.named_parameters()))
    if cfg.backend == "deepspeed":
        return _deepspeed(cfg, model)
    raise ValueError(f"unknown backend {cfg.backend!r}")


def _deepspeed(cfg: TrainConfig, model: GPT) -> Setup:
    try:
        from sai_dist import deepspeed as sai_deepspeed
    except ImportError as exc:
        raise RuntimeError(
            "--backend deepspeed needs sai_dist.deepspeed (and the deepspeed package: "
            "`pip install sai_dist[deepspeed]`)"
        ) from exc
    import json

    with open(cfg.deepspeed_config) as f:  # type: ignore[arg-type]
        ds_config = json.load(f)
    # The job owns batch size, clipping and the optimizer: keep the config consistent with
    # them instead of making the user edit it per world size.
    world = dist.get_world_size()
    ds_config.update(
        train_batch_size=cfg.global_batch,
        train_micro_batch_size_per_gpu=cfg.global_batch // world,
        gradient_accumulation_steps=1,
        gradient_clipping=cfg.grad_clip or 0.0,
    )
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)
    optimizer = make_optimizer(cfg, model.named_parameters())
    engine, ds_optimizer, _, _ = sai_deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return Setup(engine, ds_optimizer, engine=engine)
