"""Soak run of the training job: thousands of steps on 2 ranks (FSDP2, SGD-SaI) under
torchrun ``--max-restarts 1`` with periodic checkpoints and one injected SIGKILL of rank 1,
against the same job uninterrupted.

Records, for both runs: wall time, every rank's resident memory (RSS from ``/proc``, sampled
each second together with the step reached), and for the interrupted run whether the
restart resumed by itself with g-SNR loaded. Checks: every step's loss equal to the
uninterrupted run's, final parameters equal (max abs difference), memory steady (RSS slope
per 1000 steps after warm-up, within each attempt). Writes a JSON record (default
``docs/data/soak_cpu.json``) and prints a summary; exit status 1 when a check fails.

    PYTHONPATH=. python benchmarks/soak.py                       # 4000 steps, ~10-20 min on 2 cores
    PYTHONPATH=. python benchmarks/soak.py --steps 600 --kill-after 250   # a quick look

Linux only (``/proc``). Not a CI test: see tests/job/test_train_faults.py for those.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sai_dist.train.distributed import free_port  # noqa: E402
from sai_dist.train.processes import descendants, kill_all  # noqa: E402

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _worker_rank(pid: int) -> int | None:
    """The rank of a job worker (from its environment), ``None`` for other processes."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"sai_dist.train" not in cmd:
            return None
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _rss_mb(pid: int) -> float | None:
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident * PAGE_KB / 1024


def _steps_done(metrics: Path) -> int:
    try:
        with open(metrics, "rb") as f:
            return sum(1 for line in f if b'"train"' in line)
    except OSError:
        return 0


class Sampler(threading.Thread):
    """Every ``period`` s: ``(t, pid, rank, steps logged, RSS MB)`` for each job worker."""

    def __init__(self, root_pid: int, metrics: Path, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.metrics, self.period = root_pid, metrics, period
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            step = _steps_done(self.metrics)
            for pid in descendants(self.root_pid):
                rank = _worker_rank(pid)
                rss = _rss_mb(pid) if rank is not None else None
                if rss is not None:
                    self.samples.append(
                        {
                            "t": round(time.perf_counter() - self.t0, 1),
                            "pid": pid,
                            "rank": rank,
                            "step": step,
                            "rss_mb": round(rss, 1),
                        }
                    )


def run_job(
    runs: Path, name: str, job_args: list[str], env_extra: dict[str, str], timeout: float
) -> dict[str, Any]:
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "--monitor-interval=0.5",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m",
        "sai_dist.train",
        *job_args,
        "--runs-dir",
        str(runs),
        "--name",
        name,
        "--resume",
        "auto",
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env_extra)
    log = open(runs / f"{name}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    sampler = Sampler(proc.pid, runs / name / "metrics.jsonl")
    sampler.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        sampler.stop.set()
        sampler.join()
        # No stray worker may survive the script. torchrun gives each worker a session of
        # its own, so its process group is not enough: ask the agent (SIGTERM stops its
        # workers), then SIGKILL every worker the sampler saw, by pid.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_all(proc, {s["pid"] for s in sampler.samples})
        log.close()
    if code != 0:
        raise SystemExit(f"{name} exited {code}; see {runs / f'{name}.log'}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "samples": sampler.samples}


def _slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) against step, per 1000 steps."""
    n = len(points)
    if n < 3:
        return float("nan")
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return 1000 * sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else float("nan")


def memory_summary(samples: list[dict[str, Any]], steps: int, warmup_frac: float) -> list[dict[str, Any]]:
    """Per (attempt process, rank): RSS after warm-up, at the end, and the slope."""
    out = []
    for pid in sorted({s["pid"] for s in samples}):
        mine = [s for s in samples if s["pid"] == pid]
        start_step = mine[0]["step"]
        # Training only: past the warm-up of this process, before the end-of-run report
        # (rank 0 then imports matplotlib and draws the plots, which is not a leak).
        settled = [s for s in mine if start_step + warmup_frac * steps <= s["step"] < steps]
        if len(settled) < 3:
            continue
        # Allocators settle slowly: a leak keeps the slope up in the second half, while
        # one-off growth (arenas, caches filled by the first checkpoints) flattens.
        mid = (settled[0]["step"] + settled[-1]["step"]) / 2
        late = [s for s in settled if s["step"] >= mid]
        points = [(s["step"], s["rss_mb"]) for s in settled]
        out.append(
            {
                "rank": mine[0]["rank"],
                "pid": pid,
                "steps": [settled[0]["step"], settled[-1]["step"]],
                "rss_first_mb": settled[0]["rss_mb"],
                "rss_mid_mb": late[0]["rss_mb"],
                "rss_last_mb": settled[-1]["rss_mb"],
                "rss_max_mb": max(s["rss_mb"] for s in settled),
                "slope_mb_per_1000_steps": round(_slope_per_1000(points), 3),
                "slope_second_half_mb_per_1000_steps": round(
                    _slope_per_1000([(s["step"], s["rss_mb"]) for s in late]), 3
                ),
            }
        )
    return out


def final_params(run: Path, step: int) -> dict[str, Any]:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run / "final_params.pt"
    dcp_to_torch_save(str(run / "checkpoints" / f"step_{step:06d}"), str(out))
    return torch.load(out, weights_only=False)["model"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--ckpt-every", type=int, default=250)
    parser.add_argument(
        "--kill-after",
        type=int,
        default=None,
        help="step after which rank 1 is SIGKILLed (default: 55%%, off a checkpoint)",
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "data" / "soak_cpu.json"))
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()
    kill_after = (
        args.kill_after
        or (int(args.steps * 0.55) // args.ckpt_every) * args.ckpt_every + args.ckpt_every // 2
    )
    job = [
        "--backend", "fsdp2", "--optimizer", "sgdsai",
        "--n-layers", "2", "--d-model", "64", "--n-heads", "2", "--seq-len", "64", "--global-batch", "8",
        "--steps", str(args.steps), "--warmup-steps", "50",
        "--ckpt-every", str(args.ckpt_every), "--eval-every", str(args.ckpt_every), "--eval-batches", "2",
    ]  # fmt: skip
    runs = Path(tempfile.mkdtemp(prefix="sai_soak_"))
    print(
        f"soak: {args.steps} steps, checkpoint every {args.ckpt_every}, "
        f"rank 1 killed after step {kill_after}; runs in {runs}",
        flush=True,
    )
    ref = run_job(runs, "uninterrupted", job, {}, timeout=3 * 3600)
    print(f"  uninterrupted: {ref['wall_s']} s", flush=True)
    hit = run_job(
        runs,
        "interrupted",
        job,
        {"SAI_DIST_TRAIN_DIE_AFTER_STEP": str(kill_after), "SAI_DIST_TRAIN_DIE_RANK": "1"},
        timeout=3 * 3600,
    )
    print(f"  interrupted:   {hit['wall_s']} s", flush=True)

    def losses(name: str) -> dict[int, float]:
        rows = [json.loads(x) for x in open(runs / name / "metrics.jsonl")]
        return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}

    la, lb = losses("uninterrupted"), losses("interrupted")
    equal_steps = sum(1 for s in la if lb.get(s) == la[s])
    pa, pb = final_params(runs / "uninterrupted", args.steps), final_params(runs / "interrupted", args.steps)
    param_diff = max(float((pa[k].float() - pb[k].float()).abs().max()) for k in pa)
    events = [json.loads(x) for x in open(runs / "interrupted" / "events.jsonl")]
    restarts = [e for e in events if e["event"] == "start" and e["attempt"] > 0]
    warmup = 0.1
    record = {
        "command": "PYTHONPATH=. python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "job": job,
        "steps": args.steps,
        "ckpt_every": args.ckpt_every,
        "kill_after_step": kill_after,
        "wall_s": {"uninterrupted": ref["wall_s"], "interrupted": hit["wall_s"]},
        "losses_equal_steps": equal_steps,
        "losses_total_steps": len(la),
        "final_loss": la[args.steps],
        "max_abs_final_param_diff": param_diff,
        "events": events,
        "memory_after_warmup_fraction": warmup,
        "memory": {
            "uninterrupted": memory_summary(ref["samples"], args.steps, warmup),
            "interrupted": memory_summary(hit["samples"], args.steps, warmup),
        },
        # Every sample went into the summary above; about 200 per run are kept here.
        "rss_samples": {
            k: v[:: max(1, len(v) // 200)]
            for k, v in (("uninterrupted", ref["samples"]), ("interrupted", hit["samples"]))
        },
        "cpu": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    ok = (
        equal_steps == len(la) == args.steps
        and param_diff <= 1e-6
        and len(restarts) == 1
        and restarts[0]["gsnr"] == "loaded"
        and not any(e["event"] == "gsnr_computed" and e["step"] > 1 for e in events)
    )
    print(f"  losses equal at {equal_steps}/{len(la)} steps; max |final param diff| {param_diff:.3g}")
    print(f"  restart: {restarts}")
    for name in ("uninterrupted", "interrupted"):
        for m in record["memory"][name]:
            print(
                f"  {name:13s} rank {m['rank']} steps {m['steps'][0]}-{m['steps'][1]}: "
                f"RSS {m['rss_first_mb']} -> {m['rss_mid_mb']} -> {m['rss_last_mb']} MB "
                f"(max {m['rss_max_mb']}), slope {m['slope_mb_per_1000_steps']} MB/1000 steps, "
                f"second half {m['slope_second_half_mb_per_1000_steps']}"
            )
    print(f"  written to {args.out}; {'OK' if ok else 'FAILED'}")
    if not args.keep:
        import shutil

        shutil.rmtree(runs, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
