"""Convergence benchmark: SGD-SaI vs AdamW vs SGD-momentum on the ``sai-dist train`` job.

Every optimizer trains the same model on the same batches (same seed, same data order,
same warm-up + cosine schedule, same gradient clipping) for the same number of steps, at
each learning rate of a small sweep. Reported per run: final validation loss (nats/byte)
and training throughput (tokens/s, excluding each run's first step).

    PYTHONPATH=. python benchmarks/convergence.py            # the docs/benchmarks.md numbers
    PYTHONPATH=. python benchmarks/convergence.py --steps 50 --jobs 1   # a quick look

Runs go to ``runs/bench/<optimizer>-lr<lr>/`` (full run folders), the summary to
``docs/convergence.json`` and the plot to ``docs/convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

SWEEP = {
    "sgdsai": [0.3, 1.0, 3.0],
    "adamw": [1e-3, 3e-3, 1e-2],
    "sgd": [0.03, 0.1, 0.3, 1.0, 3.0],
}
LABELS = {"sgdsai": "SGD-SaI", "adamw": "AdamW", "sgd": "SGD-momentum"}


def run_one(opt: str, lr: float, args: argparse.Namespace) -> dict:
    name = f"{opt}-lr{lr:g}"
    cmd = [
        sys.executable,
        "-m",
        "sai_dist.train",
        "--backend",
        "single",
        "--optimizer",
        opt,
        "--lr",
        str(lr),
        "--steps",
        str(args.steps),
        "--seq-len",
        str(args.seq_len),
        "--global-batch",
        str(args.global_batch),
        "--eval-every",
        str(args.eval_every),
        "--ckpt-every",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--runs-dir",
        args.runs_dir,
        "--name",
        name,
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir = os.path.join(args.runs_dir, name)
    if not (args.reuse and _finished(run_dir, opt, lr, args)):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode:
            raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"]
    print(
        f"{name:>16}: val {summary['final_val_loss']:.4f}  {summary['tokens_per_s']:,.0f} tok/s", flush=True
    )
    return {
        "optimizer": opt,
        "lr": lr,
        "final_val_loss": summary["final_val_loss"],
        "tokens_per_s": summary["tokens_per_s"],
        "wall_s": summary["wall_s_this_process"],
        "val_curve": val,
        "train_curve": [(r["step"], r["loss"]) for r in records if r["kind"] == "train"],
    }


def _finished(run_dir: str, opt: str, lr: float, args: argparse.Namespace) -> bool:
    """Whether ``run_dir`` already holds this exact run, finished (for --reuse)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(run_dir, "summary.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    want = dict(
        optimizer=opt,
        lr=lr,
        steps=args.steps,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        seed=args.seed,
    )
    return all(cfg.get(k) == v for k, v in want.items())


def plot(results: list[dict], out: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for opt, label in LABELS.items():
        runs = sorted((r for r in results if r["optimizer"] == opt), key=lambda r: r["lr"])
        if not runs:
            continue
        ax1.plot([r["lr"] for r in runs], [r["final_val_loss"] for r in runs], "o-", label=label)
        best = min(runs, key=lambda r: r["final_val_loss"])
        steps_, losses = zip(*best["train_curve"], strict=True)
        line = ax2.plot(steps_, losses, lw=0.8, alpha=0.6)[0]
        vs, vl = zip(*best["val_curve"], strict=True)
        ax2.plot(vs, vl, "o-", color=line.get_color(), label=f"{label} lr {best['lr']:g} (val)")
    ax1.set_xscale("log")
    ax1.set_xlabel("peak learning rate")
    ax1.set_ylabel(f"validation loss after {steps} steps (nats/byte)")
    ax1.set_title("learning-rate sweep")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss (nats/byte)")
    ax2.set_title("best lr of each optimizer: train (thin) and validation")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--optimizers", default=",".join(SWEEP))
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--reuse", action="store_true", help="keep finished identical runs from --runs-dir")
    args = parser.parse_args()
    todo = [(o, lr) for o in args.optimizers.split(",") for lr in SWEEP[o]]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(*job, args), todo))
    os.makedirs(args.out, exist_ok=True)
    meta = {k: getattr(args, k) for k in ("steps", "seq_len", "global_batch", "seed", "jobs")}
    with open(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump({"config": meta, "total_wall_s": time.perf_counter() - t0, "runs": results}, f)
    plot(results, os.path.join(args.out, "convergence.png"), args.steps)
    print("\n| optimizer | peak lr | final val loss (nats/byte) | tokens/s |\n|---|---|---|---|")
    for r in results:
        label, loss, tps = LABELS[r["optimizer"]], r["final_val_loss"], r["tokens_per_s"]
        print(f"| {label} | {r['lr']:g} | {loss:.4f} | {tps:,.0f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
