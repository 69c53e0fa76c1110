"""Plot optimizer-state memory against model size for SGD-SaI, SGD-momentum and AdamW.

Exact figures from the accounting (fp32, one device: the paper's Table 1 setting, and per
rank under FSDP2 at 8 ranks), for every preset, with the paper's Table 1 points overlaid.

    PYTHONPATH=. python benchmarks/plot_memory.py --out docs/memory_state_vs_size.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sai_dist.memory import PRESETS, rank_memory, resolve_model
from sai_dist.memory.plan import GIB, PAPER_TABLE1

STYLE = {
    "adamw": dict(label="AdamW (2 buffers)", color="tab:red", marker="s", ls="-"),
    "sgd_momentum": dict(label="SGD-momentum (1 buffer)", color="tab:gray", marker="^", ls=":", ms=9),
    "sgd_sai": dict(label="SGD-SaI (1 buffer)", color="tab:blue", marker="o", ls="--"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/memory_state_vs_size.png")
    args = ap.parse_args()
    names = sorted({n for n in PRESETS if n != "gpt2-small"}, key=lambda n: resolve_model(n).numel)
    specs = {n: resolve_model(n) for n in names}
    sizes = [specs[n].numel for n in names]
    shapes = {n: [s for _, s in specs[n].params] for n in names}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), dpi=110)
    for ax, (strategy, world, title) in zip(
        axes,
        [
            ("single", 1, "one device, fp32 (Table 1 setting)"),
            ("fsdp2", 8, "per rank, FSDP2 at 8 ranks, fp32"),
        ],
        strict=True,
    ):
        for opt, style in STYLE.items():
            ys = [rank_memory(shapes[n], strategy, world).state[opt] / GIB for n in names]
            ax.plot(sizes, ys, **style)
        if strategy == "single":
            for model, paper in PAPER_TABLE1.items():
                x = specs[model].numel
                for opt, marker in (("sgd_sai", "o"), ("adamw", "s")):
                    ax.scatter(
                        [x], [paper[opt]], marker=marker, facecolors="none", edgecolors="k", s=140, zorder=5
                    )
            ax.scatter([], [], marker="o", facecolors="none", edgecolors="k", s=140, label="paper Table 1")
        for n, x in zip(names, sizes, strict=True):
            y = rank_memory(shapes[n], strategy, world).state["adamw"] / GIB
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(-10, 8), fontsize=7, rotation=30)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("optimizer state (GiB)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Optimizer-state memory against model size (exact, from sai_dist.memory)")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
