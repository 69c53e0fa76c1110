"""``sai-dist train`` / ``python -m sai_dist.train``.

Started by a launcher (torchrun, srun, mpirun, deepspeed) every process runs one rank.
Started bare, a distributed backend spawns ``--nproc`` local ranks itself over gloo (or
NCCL) on 127.0.0.1 with a free port, so ``sai-dist train`` with no arguments is a complete
2-rank FSDP2 run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from sai_dist.train.config import TrainConfig, add_arguments, load_json, merge
from sai_dist.train.distributed import DistEnv, detect, free_port

__all__ = ["add_arguments", "main", "run"]


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the resumed run's ``config.json``, then the flags given."""
    base = TrainConfig()
    if args.resume:
        from sai_dist.train.checkpoint import resolve
        from sai_dist.train.loop import run_dir_of_checkpoint

        saved = os.path.join(run_dir_of_checkpoint(resolve(args.resume)), "config.json")
        if os.path.isfile(saved):
            base = load_json(saved)
    return merge(base, args)


def _child(rank: int, nproc: int, port: int, cfg: dict[str, Any], resume: str | None) -> None:
    from sai_dist.train.loop import train

    env = DistEnv(rank, nproc, rank, nproc, "127.0.0.1", port, launcher="local")
    train(TrainConfig.from_json(cfg), env, resume)


def spawn_local(cfg: TrainConfig, resume: str | None) -> int:
    """Run ``cfg.nproc`` ranks as local processes; returns the first non-zero exit code."""
    import torch.multiprocessing as mp

    if cfg.name is None and not resume:
        from sai_dist.train.loop import default_name

        cfg.name = default_name(cfg)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, cfg.nproc, port, cfg.to_json(), resume), name=f"rank{r}")
        for r in range(cfg.nproc)
    ]
    # A SIGTERM to this process (scheduler time-out, `kill`) must not orphan the ranks.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    for p in procs:
        p.start()
    code = 0
    try:
        while any(p.is_alive() for p in procs):
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                # Peers of a dead rank block in a collective: stop them.
                code = failed[0].exitcode or 1
                print(
                    f"[sai-dist train] {failed[0].name} exited with {failed[0].exitcode}; "
                    "stopping the other ranks",
                    file=sys.stderr,
                )
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if code == 0:
        code = next((p.exitcode for p in procs if p.exitcode), 0)
        code = 128 - code if code < 0 else code  # killed by a signal
    return code


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    env = detect()
    if env is None and cfg.backend != "single":
        if cfg.nproc == 1:
            env = DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), launcher="local")
        else:
            return spawn_local(cfg, args.resume)
    from sai_dist.train.loop import train

    train(cfg, env, args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sai_dist.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
