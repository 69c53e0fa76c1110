"""launch/torchrun_fsdp2.py under real torchrun: FSDP2 run saving a DCP checkpoint, then a
resume on an HSDP mesh (2 replicas x 1 shard) that must restore, not recompute, g-SNR."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO
from tests.support.ranks import free_port

ROOT = REPO
pytestmark = pytest.mark.distributed


def torchrun(*args: str, timeout: float = 240) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(ROOT / "launch" / "torchrun_fsdp2.py"),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def table(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("parameter"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("step "))
    return lines[start:end]


def test_torchrun_fsdp2_save_then_hsdp_resume(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = torchrun("--steps", "5", "--ckpt-dir", ckpt)
    assert f"saved step 5 to {ckpt}" in first
    second = torchrun("--steps", "5", "--replicate", "2", "--resume", "--ckpt-dir", ckpt)
    assert "resumed at step 5 on mesh (2, 1), initialized=True" in second
    assert "saved step 10" in second
    fixed = table(first)
    # header + 29 parameters: embed, 2 x 12 per block, final norm 2, head 2
    assert len(fixed) == 1 + 29
    assert table(second) == fixed  # g-SNR restored, not recomputed from step 5's gradient
