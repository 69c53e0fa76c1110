"""Rank script for tests/clients/test_torchtitan.py: torchtitan's OptimizersContainer with
``optimizer_name="SGDSaI"`` over an FSDP2 model on 2 gloo ranks.

Runs under the torchtitan venv (``.venv-titan``): ``torchrun --nproc-per-node 2
tests/clients/titan_ranks.py OUT.json``. Writes, from rank 0, the measured errors the test
asserts: FSDP2 + container vs single-process SGDSaI on the same batches, and a resume
through DCP of the container (save at step 3 of 6, load into a fresh container) vs the
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import sai_dist
import sai_dist.torchtitan  # registers "SGDSaI" with OptimizersContainer

VOCAB, DIM, HIDDEN, SEQ, BATCH = 17, 16, 24, 6, 8
STEPS, SAVE_AT = 6, 3
HYPER = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """Embedding, two residual MLP blocks, untied head: shapes that shard unevenly on 2 ranks
    (17 rows, 1-D norms and biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in model.named_parameters()}


def sharded(seed: int = 0) -> TinyLM:
    model = make_model(seed)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def container_for(model: nn.Module):
    return sai_dist.torchtitan.sgdsai_config(**HYPER).build(model_parts=[model])


def train(model: nn.Module, opt, start: int, stop: int, rank: int, world: int) -> None:
    for step in range(start, stop):
        ids = batch(step)
        share = BATCH // world
        local = ids[rank * share : (rank + 1) * share] if world > 1 else ids
        opt.zero_grad()
        loss_of(model, local).backward()
        opt.step()


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30)) for k in want)


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, object] = {}

    # Single-process reference on the full batches (every rank computes it locally).
    ref_model = make_model()
    ref_opt = sai_dist.SGDSaI(ref_model.parameters(), **HYPER, check_ranks=False)
    train(ref_model, ref_opt, 0, STEPS, 0, 1)
    ref = params_of(ref_model)

    # Uninterrupted FSDP2 run through the container.
    model = sharded()
    opt = container_for(model)
    result["optimizer_types"] = sorted({type(o).__name__ for o in opt.optimizers})
    result["layout"] = type(opt.optimizers[0].layout).__name__
    # torchtitan's default implementation="fused" becomes SGD-SaI's fused=None; AdamW still resolves.
    result["group_fused"] = [g["fused"] for g in opt.optimizers[0].param_groups]
    from torchtitan.components.optimizer import OptimizersContainer

    result["adamw_resolves"] = OptimizersContainer._resolve_optimizer_factory("AdamW") is torch.optim.AdamW
    train(model, opt, 0, STEPS, rank, world)
    straight = params_of(model)
    result["fsdp2_vs_single_rel_err"] = rel_err(straight, ref)
    result["gsnr_table_vs_single_rel_err"] = max(
        abs(row["gsnr"] - want["gsnr"]) / want["gsnr"]
        for (name, row), want in zip(
            sai_dist.gsnr_table(model, opt.optimizers[0]).items(),
            sai_dist.gsnr_table(ref_model, ref_opt).values(),
            strict=True,
        )
    )

    # Interrupted: train to SAVE_AT, save model + container with DCP (what torchtitan's
    # CheckpointManager does with the container as a Stateful), load into a fresh model
    # and container built from another seed, continue to STEPS.
    path = [tempfile.mkdtemp(prefix="titan_ckpt_") if rank == 0 else None]
    dist.broadcast_object_list(path, 0)
    first = sharded()
    first_opt = container_for(first)
    train(first, first_opt, 0, SAVE_AT, rank, world)
    saved = first_opt.state_dict()
    result["saved_state_entries"] = sum(k.startswith("state.") for k in saved)
    dcp.save({"model": get_model_state_dict(first), "optimizer": first_opt}, checkpoint_id=path[0])

    second = sharded(seed=7)
    second_opt = container_for(second)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_sd = get_model_state_dict(second)
        dcp.load({"model": model_sd, "optimizer": second_opt}, checkpoint_id=path[0])
        set_model_state_dict(second, model_sd)
    sai = second_opt.optimizers[0]
    result["load_warnings"] = [str(w.message) for w in caught if "SGDSaI" in str(w.message)]
    result["restored_state_entries"] = sum(
        len(s) for s in sai.state.values()
    )  # per tensor: momentum, gsnr, scale, gsnr_max
    result["initialized_after_load"] = sai.initialized
    result["loaded_table_equal"] = sai_dist.gsnr_table(second, sai) == sai_dist.gsnr_table(
        first, first_opt.optimizers[0]
    )
    train(second, second_opt, SAVE_AT, STEPS, rank, world)
    resumed = params_of(second)
    result["resume_bit_identical"] = all(torch.equal(resumed[k], straight[k]) for k in straight)
    result["resume_max_abs_diff"] = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
