"""``sai-dist train`` / ``python -m sai_dist.train``.

Started by a launcher (torchrun, srun, mpirun, deepspeed) every process runs one rank.
Started bare, a distributed backend spawns ``--nproc`` local ranks itself over gloo (or
NCCL) on 127.0.0.1 with a free port, so ``sai-dist train`` with no arguments is a complete
2-rank FSDP2 run.

Resuming: ``--resume PATH`` continues a run folder or checkpoint; ``--resume auto`` (with
``--name``) continues ``runs/<name>`` when it holds a complete checkpoint and starts it
otherwise, so one command line serves the first start and every restart. Workers restarted
by torchelastic (``TORCHELASTIC_RESTART_COUNT`` > 0) resume that way even without
``--resume``. Invalid settings are reported (exit status 2, naming the flag) before any
process group or run folder exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time
from typing import Any

from sai_dist.train.config import TrainConfig, add_arguments, check_world, load_json, merge
from sai_dist.train.distributed import DistEnv, detect, free_port
from sai_dist.train.faults import restart_count

__all__ = ["add_arguments", "main", "run"]


AUTO = "auto"


def resolve_resume(args: argparse.Namespace) -> str | None:
    """The checkpoint folder this start resumes from, or ``None`` to start from scratch.

    ``--resume auto`` and a torchelastic restart look in ``<runs-dir>/<name>/checkpoints``
    for the newest complete checkpoint (a ``.partial`` folder left by a kill is ignored).
    """
    from sai_dist.train.run_checkpoints import latest, resolve

    wanted = args.resume
    if wanted is None and restart_count() > 0:
        if getattr(args, "name", None) is None:
            print(
                "[sai-dist train] warning: restarted by torchelastic, but without --name there is no "
                "run folder to resume; starting a new run (pass --name and --resume auto)",
                file=sys.stderr,
                flush=True,
            )
            return None
        wanted = AUTO
    if wanted != AUTO:
        return resolve(wanted) if wanted else None
    if getattr(args, "name", None) is None:
        raise ValueError("--resume auto needs --name: the run folder to continue (or to start)")
    runs_dir = getattr(args, "runs_dir", TrainConfig.runs_dir)
    found = latest(os.path.join(runs_dir, args.name, "checkpoints"))
    if found is not None and os.environ.get("RANK", "0") == "0":
        print(
            f"[sai-dist train] resuming from {found} (attempt {restart_count()})", file=sys.stderr, flush=True
        )
    return found


def resolve_config(args: argparse.Namespace, resume: str | None = None) -> TrainConfig:
    """Defaults, then the resumed run's ``config.json``, then the flags given."""
    base = TrainConfig()
    if resume:
        from sai_dist.train.loop import run_dir_of_checkpoint

        saved = os.path.join(run_dir_of_checkpoint(resume), "config.json")
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


def prepare(args: argparse.Namespace) -> tuple[TrainConfig, str | None, DistEnv | None]:
    """Everything decided before a process group or run folder exists: the config, the
    checkpoint to resume and the launcher's environment. Raises ``ValueError`` or
    ``FileNotFoundError`` naming the flag, key or path at fault."""
    resume = resolve_resume(args)
    cfg = resolve_config(args, resume)
    env = detect()
    if env is not None:
        check_world(cfg, env.world_size)
    elif cfg.backend != "single":
        check_world(cfg, cfg.nproc)
    return cfg, resume, env


def check_job_extras(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the missing package when the job's extra is not installed:
    the optimizer needs only torch, the job also draws a progress bar (tqdm, unless
    ``--no-progress``) and its report plots (matplotlib)."""
    needed = ["matplotlib"] + (["tqdm"] if cfg.progress else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"the training job needs {' and '.join(missing)}, which is not installed: "
            "pip install 'sai_dist[job]' (the optimizer alone needs only torch)"
        )


def run(args: argparse.Namespace) -> int:
    """Run the job; returns its exit status (2 for an invalid setting, reported on stderr
    like an argparse usage error, before anything was started or written)."""
    try:
        cfg, resume, env = prepare(args)
        check_job_extras(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sai-dist train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if env is None and cfg.backend != "single":
        if cfg.nproc == 1:
            env = DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), launcher="local")
        else:
            return spawn_local(cfg, resume)
    from sai_dist.train.loop import train

    train(cfg, env, resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sai_dist.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
