"""Convergence of low-precision SGD-SaI state (issue 16) on the ``sai-dist train`` task.

The same model (the job's default GPT: 4 layers, width 128, byte-level), the same batches,
schedule (20 warm-up steps, cosine to 0.1 of the peak), gradient clipping (1.0) and decay
groups as ``benchmarks/convergence.py``'s SGD-SaI runs, trained in this process so that
parameters can be bf16 (the job keeps fp32 parameters). Variants, all at the best fp32
learning rate of the sweep (1.0):

- ``fp32``: float32 parameters and momentum (today's SGD-SaI; the reference);
- ``bf16_momentum``, ``int8_momentum``: float32 parameters, low-precision momentum
  (int8: linear absmax code map, blocks of 2048, stochastic rounding);
- ``bf16_params_sr``: bf16 parameters and gradients, bf16 momentum, both rounded
  stochastically; ``bf16_params_nearest``: the same rounded to nearest
  (``stochastic_rounding=False``; the momentum is still rounded stochastically);
- ``bf16_params_int8_momentum``: bf16 parameters (SR) and int8 momentum: 1 B of state;
- ``int8_dynamic_momentum``: float32 parameters, int8 momentum with the *dynamic* code map
  of ``benchmarks/int8_code_maps.py`` instead of the library's linear one (same blocks,
  bytes and random bits). MEASUREMENT HOOK: for this run only, the library's int8
  encode/decode are swapped for that codec by a context manager that restores them
  (:func:`int8_code_maps.dynamic_int8`), and the optimizer runs with ``fused=False`` (the
  torch reference path) because the native kernel implements only the linear map. The
  library itself is unchanged.
- ``int8_linear_reference``: ``int8_momentum`` on that same reference path
  (``fused=False``), the like-for-like partner of ``int8_dynamic_momentum``: the native
  kernel and the reference agree to rounding (they differ in the last bits of some float32
  sums from the second step on), and 300 steps amplify that into ~0.01 nats/byte, the
  size of the seed noise.

``--seeds 0,1,2`` runs every variant for each seed (model init, batches and the
optimizer's rounding ``seed``); with several runs per variant the output gains a
per-variant summary (mean, min, max over seeds, and the mean of the per-seed differences
to fp32). ``--merge a.json,b.json`` combines the runs of separate processes instead of
training (keeping those of ``--variants``).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/convergence_lowp.py --steps 300 \
        --write docs/data/convergence_lowp.json --plot docs/convergence_lowp.png
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/convergence_lowp.py \
        --variants fp32,int8_momentum,int8_dynamic_momentum --seeds 0,1,2 \
        --write docs/data/convergence_int8_maps.json --plot docs/convergence_int8_maps.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sai_dist import SGDSaI
from sai_dist.train.backends import param_groups
from sai_dist.train.data import load_corpus, train_batch, val_batches
from sai_dist.train.model import GPT, GPTConfig, lm_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int8_code_maps import dynamic_int8  # a sibling script, not a package

VARIANTS = {
    "fp32": (torch.float32, None, None),
    "bf16_momentum": (torch.float32, "bfloat16", None),
    "int8_momentum": (torch.float32, "int8", None),
    "bf16_params_sr": (torch.bfloat16, None, True),
    "bf16_params_nearest": (torch.bfloat16, None, False),
    "bf16_params_int8_momentum": (torch.bfloat16, "int8", True),
    "int8_linear_reference": (torch.float32, "int8", None),
    "int8_dynamic_momentum": (torch.float32, "int8", None),
}
#: Variants run under the dynamic int8 code map hook.
DYNAMIC = {"int8_dynamic_momentum"}
#: Variants run on the torch reference path (``fused=False``).
REFERENCE = {"int8_linear_reference", *DYNAMIC}


def lr_factor(step: int, steps: int, warmup: int = 20, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def run(name: str, seed: int, args: argparse.Namespace, corpus) -> dict:
    with dynamic_int8() if name in DYNAMIC else contextlib.nullcontext():
        return _run(name, seed, args, corpus)


def _run(name: str, seed: int, args: argparse.Namespace, corpus) -> dict:
    dtype, momentum_dtype, sr = VARIANTS[name]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layers=4, d_model=128, n_heads=4, seq_len=args.seq_len)).to(dtype)
    opt = SGDSaI(
        param_groups(model.named_parameters(), 0.01),
        lr=args.lr,
        momentum=0.9,
        weight_decay=0.01,
        momentum_dtype=momentum_dtype,
        stochastic_rounding=sr,
        seed=seed,
        fused=False if name in REFERENCE else None,
    )
    val = val_batches(corpus, seed, 4, args.global_batch, args.seq_len, 0, 1)
    curve = []
    t0 = time.perf_counter()

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(float(lm_loss(model(x).float(), y)) for x, y in val)
        model.train()
        return total / len(val)

    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.steps)
        x, y = train_batch(corpus, seed, step, args.global_batch, args.seq_len, 0, 1)
        loss = lm_loss(model(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, evaluate()))
    state = sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for k, t in st.items()
        if k in ("momentum_buffer", "momentum_scale")
    )
    out = {
        "variant": name,
        "seed": seed,
        "final_val_loss": curve[-1][1],
        "curve": curve,
        "state_bytes": state,
        "params": sum(p.numel() for p in model.parameters()),
        "wall_s": time.perf_counter() - t0,
    }
    print(
        f"{name:>28} seed {seed}: val {out['final_val_loss']:.4f}  state {state:,} B  {out['wall_s']:.0f} s",
        flush=True,
    )
    return out


def summarize(results: list[dict]) -> dict:
    """Per variant: seeds, mean / min / max final val loss, and the per-seed paired
    difference to the fp32 run of the same seed (same init and batches), mean and range."""
    base = {r["seed"]: r["final_val_loss"] for r in results if r["variant"] == "fp32"}
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"])
        losses = [r["final_val_loss"] for r in runs]
        entry = {
            "seeds": [r["seed"] for r in runs],
            "final_val_loss": losses,
            "mean": sum(losses) / len(losses),
            "min": min(losses),
            "max": max(losses),
        }
        paired = [r["final_val_loss"] - base[r["seed"]] for r in runs if r["seed"] in base]
        if paired and len(paired) == len(runs):
            entry["delta_vs_fp32"] = paired
            entry["mean_delta_vs_fp32"] = sum(paired) / len(paired)
            entry["min_delta_vs_fp32"] = min(paired)
            entry["max_delta_vs_fp32"] = max(paired)
        out[name] = entry
    return out


def plot(results: list[dict], path: str) -> None:
    """Validation loss against step: per variant the mean over its seeds (one line, the
    legend giving the mean final loss and the seed count) and the band between the seeds'
    lowest and highest loss at each evaluation, so many seeds stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant]
        steps = [s for s, _ in runs[0]["curve"]]
        per_step = [[dict(r["curve"])[s] for r in runs] for s in steps]
        mean = [sum(v) / len(v) for v in per_step]
        final = sum(r["final_val_loss"] for r in runs) / len(runs)
        (line,) = ax.plot(
            steps, mean, marker="o", markersize=3, label=f"{variant} ({final:.4f}, {len(runs)} seeds)"
        )
        if len(runs) > 1:
            lo, hi = [min(v) for v in per_step], [max(v) for v in per_step]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte): mean over seeds, band = min..max")
    ax.set_title("SGD-SaI low-precision state, same job and batches, lr 1.0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--merge", help="comma-separated JSON files of earlier runs to combine (no training)")
    parser.add_argument("--write")
    parser.add_argument("--plot")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.merge:
        results, configs = [], []
        for path in args.merge.split(","):
            with open(path) as f:
                data = json.load(f)
            configs.append(data["config"])
            results.extend(r for r in data["runs"] if r["variant"] in variants)  # --variants picks
    else:
        torch.set_num_threads(1)
        corpus = load_corpus()
        results = [run(v, seed, args, corpus) for seed in seeds for v in variants]
        configs = [vars(args)]
    summary = summarize(results)
    for name, e in summary.items():
        line = f"{name:>28}: seeds {e['seeds']} mean {e['mean']:.4f} (min {e['min']:.4f}, max {e['max']:.4f})"
        if "mean_delta_vs_fp32" in e:
            line += (
                f"  vs fp32 {e['mean_delta_vs_fp32']:+.4f}"
                f" ({e['min_delta_vs_fp32']:+.4f} .. {e['max_delta_vs_fp32']:+.4f})"
            )
        print(line)
    if args.write:
        os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
        config = configs[0] if len(configs) == 1 else {"merged": configs}
        with open(args.write, "w") as f:
            json.dump({"config": config, "summary": summary, "runs": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
