"""Plot the 7B run of benchmarks/seven_b.py: each optimizer's predicted peak against the
memory it reached under the cap (trained, or where it ran out of memory).

    PYTHONPATH=. python benchmarks/plot_seven_b.py docs/data/seven_b_cpu.json --out docs/seven_b_cpu.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GIB = 1 << 30
LABELS = {
    "sgd_sai_int8": "SGD-SaI, int8 momentum",
    "sgd_sai_bf16": "SGD-SaI, bf16 momentum",
    "sgd_sai_fp32": "SGD-SaI, fp32 momentum",
    "adamw_8bit": "AdamW 8-bit (torchao)",
    "adamw_bf16": "AdamW, bf16 state",
    "adamw_fp32": "AdamW, fp32 state",
}


def _predictions(report: dict) -> dict:
    """Today's accounting for a preset of ``sai_dist.memory`` (so the plot follows the
    accounting as it improves); the predictions recorded with the run otherwise."""
    from sai_dist.memory import PRESETS
    from sai_dist.memory.in_backward import seven_b_predictions

    if report["preset"] not in PRESETS:
        return report["predicted"]
    config = PRESETS[report["preset"]]
    return seven_b_predictions(config, report["batch"], report["context"], device=report["device"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="the JSON seven_b.py wrote")
    ap.add_argument("--out", default="docs/seven_b_cpu.png")
    args = ap.parse_args()
    with open(args.report) as f:
        report = json.load(f)
    predicted = _predictions(report)
    runs = [r for r in report["runs"] if r["run"] in LABELS]
    runs.sort(key=lambda r: predicted[r["run"]]["total"])
    fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(runs) + 1.6))
    for i, r in enumerate(runs):
        peak = predicted[r["run"]]["total"] / GIB
        reached = r.get("peak_vm_hwm_bytes", 0) / GIB
        trained = r["status"] == "trained"
        ax.barh(i, peak, color="none", edgecolor="tab:gray", hatch="//", height=0.7)
        ax.barh(i, reached, color="tab:blue" if trained else "tab:red", height=0.45)
        what = f"trained {r['steps_done']} steps" if trained else r["status"]
        note = f"{what}: {reached:.2f} of {peak:.2f} GiB" if reached else f"{what} (predicted {peak:.2f} GiB)"
        ax.text(max(peak, reached) * 1.02, i, note, va="center")
    cap = report["cap_bytes"] / GIB
    ax.axvline(cap, color="black", lw=1.2, ls="--")
    ax.text(cap, -0.75, f" cap {cap:g} GiB", va="bottom")
    ax.set_ylim(-0.8, len(runs) - 0.4)
    ax.set_yticks(range(len(runs)), [LABELS[r["run"]] for r in runs])
    ax.set_xlabel("GiB (hatched: predicted by sai-dist memory; solid: peak resident set reached, VmHWM)")
    ax.set_xlim(0, max(predicted[r["run"]]["total"] for r in runs) / GIB * 1.75)
    n = next((r["parameters"] for r in runs if r.get("parameters")), 0)
    ax.set_title(f"{report['preset']} ({n / 1e9:.2f} B parameters, bf16), in-backward, {report['device']}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
