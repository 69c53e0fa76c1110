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
- ``bf16_params_int8_momentum``: bf16 parameters (SR) and int8 momentum: 1 B of state.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/convergence_lowp.py --steps 300 \
        --write docs/data/convergence_lowp.json --plot docs/convergence_lowp.png
"""

from __future__ import annotations

import argparse
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

VARIANTS = {
    "fp32": (torch.float32, None, None),
    "bf16_momentum": (torch.float32, "bfloat16", None),
    "int8_momentum": (torch.float32, "int8", None),
    "bf16_params_sr": (torch.bfloat16, None, True),
    "bf16_params_nearest": (torch.bfloat16, None, False),
    "bf16_params_int8_momentum": (torch.bfloat16, "int8", True),
}


def lr_factor(step: int, steps: int, warmup: int = 20, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def run(name: str, args: argparse.Namespace, corpus) -> dict:
    dtype, momentum_dtype, sr = VARIANTS[name]
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(n_layers=4, d_model=128, n_heads=4, seq_len=args.seq_len)).to(dtype)
    opt = SGDSaI(
        param_groups(model.named_parameters(), 0.01),
        lr=args.lr,
        momentum=0.9,
        weight_decay=0.01,
        momentum_dtype=momentum_dtype,
        stochastic_rounding=sr,
    )
    val = val_batches(corpus, args.seed, 4, args.global_batch, args.seq_len, 0, 1)
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
        x, y = train_batch(corpus, args.seed, step, args.global_batch, args.seq_len, 0, 1)
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
        "final_val_loss": curve[-1][1],
        "curve": curve,
        "state_bytes": state,
        "params": sum(p.numel() for p in model.parameters()),
        "wall_s": time.perf_counter() - t0,
    }
    print(
        f"{name:>28}: val {out['final_val_loss']:.4f}  state {state:,} B  {out['wall_s']:.0f} s", flush=True
    )
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=f"{r['variant']} ({r['final_val_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--write")
    parser.add_argument("--plot")
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = load_corpus()
    results = [run(v, args, corpus) for v in args.variants.split(",")]
    base = next((r for r in results if r["variant"] == "fp32"), None)
    if base is not None:
        for r in results:
            r["delta_vs_fp32"] = r["final_val_loss"] - base["final_val_loss"]
            print(f"{r['variant']:>28}: {r['delta_vs_fp32']:+.4f} nats/byte vs fp32")
    if args.write:
        os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
        with open(args.write, "w") as f:
            json.dump({"config": vars(args), "runs": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
