"""Launch a client's rank script with torchrun in a subprocess, bounded in time.

Clients that own the process launch (the Trainer, accelerate, Lightning, torchtitan) are
run the way their users run them: ``torchrun --nproc-per-node N script.py ARGS``, on gloo
over 127.0.0.1, one intra-op thread per rank. The script writes its measurements to a JSON
file; :func:`torchrun` returns them and fails with the ranks' output on a non-zero exit or
timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sai_dist.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TITAN_PYTHON = ROOT / ".venv-titan" / "bin" / "python"


def torchrun(
    script: str,
    out: Path,
    *args: str,
    nproc: int = 2,
    python: str | os.PathLike[str] = sys.executable,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``tests/clients/<script>`` on ``nproc`` ranks; return the JSON it wrote to ``out``."""
    cmd = [
        str(python),
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "--master-addr=127.0.0.1",
        str(HERE / script),
        str(out),
        *args,
    ]
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        **(env or {}),
    }
    try:
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{script} exceeded {timeout:.0f} s:\n{e.stdout}\n{e.stderr}") from None
    if proc.returncode != 0:
        tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{tail}")
    return json.loads(out.read_text())
