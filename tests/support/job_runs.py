"""Running the training job as users start it: a subprocess of ``python -m sai_dist.train``
(or a launch/ script) on 127.0.0.1, its environment cleaned of any outer launcher's
variables, its per-step losses read back from the run folder's metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sai_dist.train.processes import wait_tree
from tests.support.paths import REPO

BIN = Path(sys.executable).parent
TINY = [
    "--n-layers",
    "1",
    "--d-model",
    "32",
    "--n-heads",
    "2",
    "--seq-len",
    "32",
    "--global-batch",
    "4",
    "--steps",
    "8",
    "--warmup-steps",
    "3",
    "--eval-every",
    "4",
    "--ckpt-every",
    "4",
    "--no-progress",
]
# The same tiny model as a TrainConfig, for tests that call the job in-process.
TINY_CONFIG = dict(n_layers=1, d_model=32, n_heads=2, seq_len=32, global_batch=4)


def tiny_train_config(runs_dir: str | os.PathLike, name: str, **over: Any) -> Any:
    """A validated single-process :class:`~sai_dist.train.config.TrainConfig` of the
    :data:`TINY_CONFIG` model, no progress bar; ``over`` sets (or overrides) any field."""
    from sai_dist.train.config import TrainConfig

    fields = dict(name=name, runs_dir=str(runs_dir), backend="single", progress=False, **TINY_CONFIG)
    cfg = TrainConfig(**{**fields, **over})
    cfg.validate()
    return cfg


LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith(("SLURM_", "PMI"))}
    env.update(
        PYTHONPATH=str(REPO), PATH=f"{BIN}:{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHON=sys.executable
    )
    env.update(extra)
    return env


def start_job(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish_job(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    return wait_tree(proc, timeout)


def run_ok(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    code, out = finish_job(start_job(cmd, env or job_env()), timeout)
    assert code == 0, f"{cmd} exited {code}:\n{out[-4000:]}"
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def losses(run: Path) -> dict[int, float]:
    out = {r["step"]: r["loss"] for r in records(run) if r["kind"] == "train"}
    assert sorted(out) == list(range(1, len(out) + 1)), f"steps of {run}: {sorted(out)}"
    return out


def job(*args: str) -> list[str]:
    return [sys.executable, "-m", "sai_dist.train", *TINY, *args]


def spawned(tmp_path: Path, name: str, *args: str) -> dict[int, float]:
    """The job's own launch: no launcher, it spawns --nproc local ranks."""
    run_ok(job("--runs-dir", str(tmp_path), "--name", name, *args))
    return losses(tmp_path / name)
