"""The training job under every launcher, as users start it: the scripts in launch/,
run as subprocesses on 127.0.0.1 with a free port, tiny model, a few steps.

Every launched run is compared with the job's own spawned run (same backend, same world
size): the per-step losses must be identical, which shows that the launcher was detected
correctly (ranks, world size, data shards) and changed nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support.job_runs import REPO, TINY, finish_job, job, job_env, losses, run_ok, spawned, start_job
from tests.support.ranks import free_port

pytestmark = pytest.mark.distributed


def has_dtensor_layout() -> bool:
    try:
        import sai_dist.layouts.dtensor  # noqa: F401
    except ImportError:
        return False
    return True


needs_dtensor = pytest.mark.skipif(
    not has_dtensor_layout(), reason="sai_dist.layouts.dtensor not on this branch"
)


@pytest.mark.parametrize(
    "backend_opt",
    [
        ("ddp", "sgdsai"),
        ("fsdp2", "adamw"),
        pytest.param(("fsdp2", "sgdsai"), marks=needs_dtensor),
        pytest.param(("hsdp", "sgdsai"), marks=needs_dtensor),
    ],
    ids=lambda b: "-".join(b),
)
def test_spawned_ranks_match_single_process(tmp_path: Path, backend_opt: tuple[str, str]) -> None:
    backend, opt = backend_opt
    single = spawned(tmp_path, "single", "--backend", "single", "--optimizer", opt)
    dist = spawned(tmp_path, "dist", "--backend", backend, "--optimizer", opt, "--nproc", "2")
    assert list(dist) == list(single)
    for step in single:
        assert dist[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step
    assert single[8] < single[1] - 0.05  # it learns


@pytest.mark.parametrize(
    "backend_opt",
    [("ddp", "sgdsai"), ("fsdp2", "adamw"), pytest.param(("fsdp2", "sgdsai"), marks=needs_dtensor)],
    ids=lambda b: "-".join(b),
)
def test_kill_and_resume_continues_identically(tmp_path: Path, backend_opt: tuple[str, str]) -> None:
    backend, opt = backend_opt
    common = ["--backend", backend, "--optimizer", opt, "--steps", "12", "--runs-dir", str(tmp_path)]
    full = spawned(tmp_path, "full", *common)
    # Rank 0 SIGKILLs itself after step 6: the checkpoint of step 4 is the latest complete one,
    # and steps 5-6 were logged but must be redone.
    die = job_env(SAI_DIST_TRAIN_DIE_AFTER_STEP="6")
    code, out = finish_job(start_job(job(*common, "--name", "killed"), die))
    assert code != 0, out[-2000:]
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "LATEST").read_text().strip() == "step_000004"
    assert max(losses(killed)) == 6
    # Only --resume: the run's saved config (12 steps, backend, model) is reused.
    run_ok([sys.executable, "-m", "sai_dist.train", "--resume", str(killed), "--no-progress"])
    resumed = losses(killed)
    assert list(resumed) == list(range(1, 13))
    assert resumed == full  # bit-identical, every step
    assert (killed / "checkpoints" / "step_000012" / "meta.json").is_file()


@needs_dtensor
@pytest.mark.parametrize("target", [("fsdp2", "2"), ("single", "1")], ids=lambda t: f"{t[0]}x{t[1]}")
def test_resume_under_another_backend_and_world_size(tmp_path: Path, target: tuple[str, str]) -> None:
    """A DDP checkpoint (2 ranks) resumes under FSDP2 (sharded) or in a single process:
    DCP reshards model and SGD-SaI state by parameter name."""
    backend, nproc = target
    ddp = spawned(tmp_path, "run", "--backend", "ddp")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000004"
    run_ok(
        [
            sys.executable,
            "-m",
            "sai_dist.train",
            "--resume",
            str(ckpt),
            "--backend",
            backend,
            "--nproc",
            nproc,
            "--no-progress",
        ]
    )
    resumed = losses(tmp_path / "run")
    assert list(resumed) == list(ddp)
    for step in range(1, 5):
        assert resumed[step] == ddp[step]  # kept from the first run
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), step
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert (summary["backend"], summary["world_size"]) == (backend, int(nproc))


def test_deepspeed_kill_and_resume_continues_identically(tmp_path: Path) -> None:
    pytest.importorskip("sai_dist.deepspeed", reason="sai_dist.deepspeed not on this branch")
    common = [
        "--backend",
        "deepspeed",
        "--deepspeed-config",
        "configs/ds_zero2.json",
        "--steps",
        "12",
        "--runs-dir",
        str(tmp_path),
    ]
    full = spawned(tmp_path, "full", *common)
    die = job_env(SAI_DIST_TRAIN_DIE_AFTER_STEP="6")
    code, out = finish_job(start_job(job(*common, "--name", "killed"), die))
    assert code != 0, out[-2000:]
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "LATEST").read_text().strip() == "step_000004"
    run_ok([sys.executable, "-m", "sai_dist.train", "--resume", str(killed), "--no-progress"])
    assert losses(killed) == full


@needs_dtensor
def test_two_torchrun_nodes_match_one_node(tmp_path: Path) -> None:
    args = ["--backend", "fsdp2", "--runs-dir", str(tmp_path)]
    run_ok(["bash", "launch/torchrun_single_node.sh", *TINY, *args, "--name", "one"], job_env(NPROC="2"))
    env = job_env(NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="test2node")
    cmd = ["bash", "launch/torchrun_multi_node.sh", *TINY, *args, "--name", "two"]
    nodes = [start_job(cmd, env), start_job(cmd, env)]
    results = [finish_job(p) for p in nodes]
    for code, out in results:
        assert code == 0, out[-4000:]
    cfg = json.load(open(tmp_path / "two" / "summary.json"))
    assert cfg["world_size"] == 2
    assert losses(tmp_path / "two") == losses(tmp_path / "one")


def test_mpirun_trains(tmp_path: Path) -> None:
    args = ["--backend", "ddp", "--runs-dir", str(tmp_path)]
    reference = spawned(tmp_path, "ref", *args)
    out = run_ok(["bash", "launch/mpirun.sh", *TINY, *args, "--name", "mpi"], job_env(NP="2"))
    assert "ddp on 2 rank(s)" in out
    assert losses(tmp_path / "mpi") == reference


def test_deepspeed_launcher_with_hostfile_trains(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    args = ["--backend", "fsdp2", "--optimizer", "adamw", "--runs-dir", str(tmp_path)]
    reference = spawned(tmp_path, "ref", *args)
    env = job_env(HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()))
    out = run_ok(["bash", "launch/deepspeed.sh", *TINY, *args, "--name", "ds"], env)
    assert "fsdp2 on 2 rank(s)" in out
    assert losses(tmp_path / "ds") == reference


@pytest.mark.parametrize(
    "config", ["configs/ds_zero1.json", "configs/ds_zero2.json", "configs/ds_zero3.json"]
)
def test_deepspeed_backend_under_deepspeed_launcher(tmp_path: Path, config: str) -> None:
    pytest.importorskip("sai_dist.deepspeed", reason="sai_dist.deepspeed not on this branch")
    if not (REPO / config).is_file():
        pytest.skip(f"{config} not on this branch")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = job_env(HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()))
    args = [
        "--backend",
        "deepspeed",
        "--deepspeed-config",
        config,
        "--runs-dir",
        str(tmp_path),
        "--name",
        "ds",
    ]
    run_ok(["bash", "launch/deepspeed.sh", *TINY, *args], env)
    # The launcher sets LOCAL_SIZE, so DeepSpeed's CPU comm op made a ~67 MB /dev/shm
    # segment per rank, which it never unlinks: the job releases its own.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*"))
    ds = losses(tmp_path / "ds")
    single = spawned(tmp_path, "single", "--backend", "single")
    for step in single:
        assert ds[step] == pytest.approx(single[step], rel=1e-4, abs=1e-5), step
    assert (tmp_path / "ds" / "gsnr_table.txt").is_file()


FAKE_SRUN = """#!/usr/bin/env python3
# Stand-in for srun on a machine without SLURM: starts SLURM_NTASKS tasks with the
# variables srun gives each task of a job step, on one node.
import os, subprocess, sys
n = int(os.environ["SLURM_NTASKS"])
args = [a for a in sys.argv[1:] if not a.startswith("--kill-on-bad-exit")]
procs = []
for r in range(n):
    env = dict(os.environ, SLURM_STEP_ID="0", SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
               SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_NODELIST="127.0.0.1",
               SLURM_STEP_TASKS_PER_NODE=str(n))
    procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
"""


def test_sbatch_script_under_srun_trains(tmp_path: Path) -> None:
    srun = tmp_path / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    args = ["--backend", "ddp", "--runs-dir", str(tmp_path)]
    reference = spawned(tmp_path, "ref", *args)
    # The batch script's own environment: a job with 2 tasks on one node.
    env = job_env(
        SRUN=str(srun),
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_PROCID="0",
        SLURM_SUBMIT_DIR=str(REPO),
        MASTER_PORT=str(free_port()),
    )
    out = run_ok(["bash", "launch/slurm.sbatch", *TINY, *args], env)
    assert "ddp on 2 rank(s)" in out
    assert losses(tmp_path / "slurm-4242") == reference


@needs_dtensor
def test_no_argument_job_leaves_the_run_folder(tmp_path: Path) -> None:
    """The README command with only fewer steps: default backend (FSDP2 on 2 spawned
    ranks), default model and optimizer (SGD-SaI)."""
    cmd = [
        sys.executable,
        "-m",
        "sai_dist.cli",
        "train",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--ckpt-every",
        "3",
        "--runs-dir",
        str(tmp_path),
    ]
    run_ok(cmd, timeout=400)
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("fsdp2-sgdsai-")
    cfg = json.load(open(run / "config.json"))
    assert (cfg["backend"], cfg["optimizer"], cfg["nproc"]) == ("fsdp2", "sgdsai", 2)
    summary = json.load(open(run / "summary.json"))
    assert summary["world_size"] == 2 and summary["final_val_loss"] < 5.6
    assert sorted(losses(run)) == list(range(1, 7))
    for name in ("gsnr_table.txt", "gsnr.png", "loss.png", "checkpoints/step_000006/meta.json"):
        assert (run / name).is_file(), name
    table = (run / "gsnr_table.txt").read_text().splitlines()
    assert table[0].split()[:2] == ["parameter", "numel"] and len(table) == 1 + len(
        json.load(open(run / "gsnr_table.json"))
    )
