"""Measure optimizer-state memory the way the paper's Table 1 did: peak of torch.profiler's
OPTIMIZER_STATE category (memory timeline), full fp32, batch 1, context 1024.

The paper measured on an A100; this runs on CPU at a size a 24 GiB machine holds
(gpt2-medium by default) so that what the profiler counts can be compared with the
accounting, byte for byte. Each (model, optimizer) runs in a fresh subprocess so runs do
not share allocator state.

    PYTHONPATH=. python benchmarks/table1_profile.py --model gpt2-medium --steps 3
    PYTHONPATH=. python benchmarks/table1_profile.py --device cuda --model gpt2-xl  # on a GPU

Optimizers: ``sgd_sai`` (this package), ``adamw`` (torch, foreach off like the CPU default),
``official`` (the state layout of the official SGD-SaI v1.0.3: momentum clone of the
gradient plus a 0-d ``gsnr`` tensor on the parameter's device, written for this
measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from sai_dist.memory.models import PRESETS, build_model, param_shapes


class OfficialStyle(torch.optim.Optimizer):
    """State layout of the official SGD-SaI code (v1.0.3): per tensor a momentum buffer
    (clone of the first gradient) and a 0-d device tensor with its g-SNR."""

    def __init__(self, params, lr=1e-3, momentum=0.9, eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                g = p.grad
                if "gsnr" not in st:
                    st["gsnr"] = g.norm() / (g.std().nan_to_num() + group["eps"])
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = g.clone()
                else:
                    st["momentum_buffer"].mul_(group["momentum"]).add_(g, alpha=1 - group["momentum"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(st["momentum_buffer"], alpha=-group["lr"] * float(st["gsnr"]))


def measure(
    model_name: str, optimizer: str, steps: int, batch: int, context: int, device: str = "cpu"
) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    from sai_dist import SGDSaI

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with torch.device(device):
        model = build_model(PRESETS[model_name])
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd_sai":
        opt = SGDSaI(params, lr=1e-3)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    elif optimizer == "official":
        opt = OfficialStyle(params)
    else:
        raise ValueError(optimizer)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch, context), device=device)
    y = torch.randint(0, vocab, (batch, context), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for _ in range(steps):
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline("cuda:0" if device == "cuda" else "cpu")
    peaks = {}
    for cat, idx in _CATEGORY_TO_INDEX.items():
        name = "unknown" if cat is None else cat.name
        peaks[name] = max(row[idx + 1] for row in sizes)
    numel = sum(torch.Size(s).numel() for _, s in param_shapes(model))
    state_tensors = sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )
    return dict(
        model=model_name,
        optimizer=optimizer,
        device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        parameters=numel,
        param_tensors=len(params),
        steps=steps,
        state_bytes_held=state_tensors,
        profiler_peak_bytes=peaks,
        seconds=round(elapsed, 1),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-medium", choices=sorted(PRESETS))
    ap.add_argument("--optimizers", default="sgd_sai,adamw,official")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "table1_profile --device cuda: no CUDA device on this machine; nothing was run", file=sys.stderr
        )
        return 2
    if args.one:
        print(
            json.dumps(
                measure(args.model, args.optimizers, args.steps, args.batch, args.context, args.device)
            )
        )
        return 0
    results = []
    for name in args.optimizers.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            "--model",
            args.model,
            "--optimizers",
            name,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--context",
            str(args.context),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        p = res["parameters"]
        opt_peak = res["profiler_peak_bytes"]["OPTIMIZER_STATE"]
        print(
            f"{args.model} {name:9s} params {p:,}  held state {res['state_bytes_held']:,} B  "
            f"profiler OPTIMIZER_STATE peak {opt_peak:,} B = {opt_peak / 2**30:.4f} GiB "
            f"({opt_peak / (4 * p):.4f} x fp32 params)  [{res['seconds']} s]",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
