"""A small DeepSpeed training script with ``"type": "SGDSaI"`` in its config.

Runs under every launcher DeepSpeed users have:

* ``deepspeed --hostfile launch/hostfile launch/ds_train.py --config configs/ds_zero2.json``
  (the launcher sets RANK/WORLD_SIZE/MASTER_ADDR and passes ``--local_rank``);
* ``mpiexec -n 2 python launch/ds_train.py --config configs/ds_zero2.json`` (mpich or Open MPI
  with mpi4py): ranks come from the MPI environment; rank 0's address and a free port are
  broadcast with mpi4py unless MASTER_ADDR/MASTER_PORT are set;
* ``torchrun --nproc-per-node 2 launch/ds_train.py ...``.

The model is an MLP regressing a fixed random teacher on synthetic data, sharded by rank,
so the loss must fall. ``--cpu`` uses gloo (CPU-only machines); otherwise DeepSpeed's
default backend for the accelerator. ``--out`` writes a JSON summary from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn


def discover_launcher() -> None:
    """Export torchrun-style RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for whichever launcher
    started us (torchrun, the deepspeed launcher, SLURM srun, mpirun with mpi4py), using the
    same detection as ``sai-dist train``. Under mpirun, rank 0's host and a free port are
    broadcast with mpi4py unless MASTER_ADDR/MASTER_PORT are set. DeepSpeed's own MPI
    discovery is left off: it would take MASTER_ADDR from ``hostname -I``."""
    from sai_dist.train.distributed import detect

    env = detect()
    if env is not None:
        env.export()


def make_model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 8)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="DeepSpeed JSON config")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="override the config's optimizer lr")
    parser.add_argument("--cpu", action="store_true", help="gloo backend, CPU tensors")
    parser.add_argument("--out", default=None, help="write a JSON summary here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args()

    discover_launcher()
    import deepspeed

    import sai_dist
    import sai_dist.deepspeed as sds

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    deepspeed.init_distributed(dist_backend="gloo" if args.cpu else None, auto_mpi_discovery=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    torch.manual_seed(0)
    model = make_model(args.width)
    teacher = make_model(16)
    with open(args.config) as f:
        config = json.load(f)
    if args.lr is not None:
        config["optimizer"]["params"]["lr"] = args.lr
    engine, _, _, _ = sds.initialize(model=model, model_parameters=model.parameters(), config=config)
    device = engine.device
    micro = engine.train_micro_batch_size_per_gpu()
    gas = engine.gradient_accumulation_steps()
    dtype = (
        torch.bfloat16 if engine.bfloat16_enabled() else (torch.float16 if engine.fp16_enabled() else None)
    )

    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for micro_step in range(gas):
            g = torch.Generator().manual_seed((step * gas + micro_step) * world + rank)
            x = torch.randn(micro, 32, generator=g)
            with torch.no_grad():
                y = 4.0 * teacher(x)  # a target big enough to learn at lr 1e-2
            x, y = x.to(device), y.to(device)
            out = engine(x.to(dtype) if dtype else x)
            loss = F.mse_loss(out.float(), y)
            engine.backward(loss)
            engine.step()
        reduced = loss.detach().float().clone()
        torch.distributed.all_reduce(reduced)
        losses.append(float(reduced) / world)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.5f}", flush=True)
    elapsed = time.perf_counter() - t0

    table = sai_dist.gsnr_table(engine.module, engine)
    if rank == 0:
        print(sai_dist.format_table(table), flush=True)
        print(f"{args.steps} steps in {elapsed:.2f} s on {world} ranks", flush=True)
        if args.out:
            summary = {
                "world_size": world,
                "losses": losses,
                "seconds": elapsed,
                "num_params": sum(1 for p in model.parameters() if p.requires_grad),
                "gsnr_params": len(table),
                "wrapper": type(engine.optimizer).__name__,
            }
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=2)
    # As in launch/torchrun_fsdp2.py: every rank leaves together, after rank 0's write.
    torch.distributed.barrier()
    engine.destroy()
    torch.distributed.destroy_process_group()
    # DeepSpeed never unlinks its CPU all-reduce workspace (~67 MB of /dev/shm per rank).
    sds.release_shm_workspace(rank)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
