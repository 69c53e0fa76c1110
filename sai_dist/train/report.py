"""What a finished run leaves to look at: the g-SNR table and PNG plots (matplotlib Agg)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(records: list[dict[str, Any]], out: str, title: str) -> None:
    """Training loss per step and validation loss at each evaluation, nats per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), lw=1, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_gsnr(table: dict[str, dict[str, float | int]], out: str, title: str) -> None:
    """One horizontal bar per parameter: the learning-rate scale SGD-SaI fixed at step 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    scales = [float(table[n]["scale"]) for n in names]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.18 * len(names) + 1)))
    ax.barh(range(len(names)), scales)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("g-SNR scale (g-SNR / max g-SNR)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
