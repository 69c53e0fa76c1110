"""Tight memory: SGD-SaI trains where AdamW runs out of memory under the same cap.

Two parts, each optimizer in a fresh subprocess:

* ``--part gpu`` (needs CUDA): a Llama2-7B-shaped decoder (random init, fp32, batch 1,
  context 1024). First each optimizer runs uncapped if the device holds it, giving the
  measured peaks (``torch.cuda.max_memory_allocated``) and their difference (expected
  about one fp32 buffer, 25.1 GiB). Then the process is capped with
  ``torch.cuda.set_per_process_memory_fraction`` halfway between the two predicted peaks:
  SGD-SaI trains, AdamW raises ``torch.OutOfMemoryError``. Skips cleanly without CUDA.
* ``--part cpu``: the same on CPU at a size a 24 GiB machine holds, a Llama-shaped model
  (about 0.55B parameters by default), under ``resource.setrlimit(RLIMIT_DATA)`` (private
  writable memory: heap and anonymous mappings) set in the child. Peaks are the kernel's
  resident high-water mark (``VmHWM``) above the resident size before the model existed.

    PYTHONPATH=. python benchmarks/tight_memory.py --part cpu
    PYTHONPATH=. python benchmarks/tight_memory.py --part gpu --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from process_memory import status_kib

GIB = 1 << 30
MODES = ("sgd_sai", "adamw", "sgd_sai_in_backward")


def _config(part: str, dim: int | None, layers: int | None):
    from sai_dist.memory.models import PRESETS, LlamaConfig

    if part == "gpu":
        return PRESETS["llama2-7b"]
    # Llama-shaped: SwiGLU width ~2.67 d, 128-dim heads, Llama 2 vocabulary.
    d = dim or 1536
    inter = (8 * d // 3 + 255) // 256 * 256
    return LlamaConfig(n_layer=layers or 16, n_head=d // 128, n_kv_head=d // 128, dim=d, intermediate=inter)


def child(args: argparse.Namespace) -> dict:
    """One optimizer, one process: build, (cap,) train, report."""
    import torch

    from sai_dist import SGDSaI
    from sai_dist.in_backward import InBackwardSGDSaI
    from sai_dist.memory.models import LlamaDecoder

    cuda = args.part == "gpu"
    torch.manual_seed(0)
    if not cuda:
        torch.set_num_threads(args.threads)
        baseline = status_kib("VmRSS")
        if args.cap:
            data_now = status_kib("VmData") * 1024
            resource.setrlimit(resource.RLIMIT_DATA, (data_now + args.cap, data_now + args.cap))
    else:
        if args.cap:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap / total))
        torch.cuda.reset_peak_memory_stats()
    config = _config(args.part, args.dim, args.layers)
    device = torch.device("cuda" if cuda else "cpu")
    result: dict = dict(mode=args.mode, cap=args.cap, steps_done=0)
    t0 = time.perf_counter()
    try:
        with torch.device("meta"):
            model = LlamaDecoder(config)
        model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        runner = None
        if args.mode == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        elif args.mode == "sgd_sai":
            opt = SGDSaI(model.parameters(), lr=1e-3)
        else:
            runner = InBackwardSGDSaI(model.parameters(), lr=1e-3)
        losses = []
        for step in range(args.steps):
            g = torch.Generator().manual_seed(step)
            x = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=g).to(device)
            y = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=g).to(device)
            loss = model(x, y)
            loss.backward()
            if runner is None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            result["steps_done"] = step + 1
        result["losses"] = losses
        result["status"] = "trained"
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0][:200]
        if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and "alloc" not in msg.lower():
            raise
        result["status"] = "out of memory"
        result["error"] = f"{type(exc).__name__}: {msg}"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_bytes"] = (status_kib("VmHWM") - baseline) * 1024
    return result


def _predicted_peaks(part: str, config, batch: int, context: int) -> dict[str, int]:
    """Accounting (params + grads + state) plus the activation estimate, per mode."""
    import torch

    from sai_dist.memory.accounting import rank_memory
    from sai_dist.memory.models import LlamaDecoder, ModelSpec, param_shapes
    from sai_dist.memory.plan import estimate_activations

    with torch.device("meta"):
        module = LlamaDecoder(config)
    spec = ModelSpec("llama", module, config, param_shapes(module))
    mem = rank_memory([s for _, s in spec.params], "single")
    act = estimate_activations(spec, batch, context, "fp32") or 0
    return {
        "sgd_sai": mem.total("sgd_sai", act),
        "adamw": mem.total("adamw", act),
        "sgd_sai_in_backward": mem.params + mem.state["sgd_sai"] + act,
        "activations_estimate": act,
        "one_buffer": mem.state["sgd_sai"],
    }


def run_child(args: argparse.Namespace, mode: str, cap: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--part", args.part, "--mode", mode, "--cap", str(cap)]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--context", str(args.context)]
    cmd += ["--threads", str(args.threads)]
    if args.dim:
        cmd += ["--dim", str(args.dim)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        # A hard kill (the kernel's OOM killer, a malloc abort) is an out-of-memory too.
        status = f"died (exit {out.returncode})"
        return dict(mode=mode, cap=cap, status=status, error=out.stderr.strip()[-300:])
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=None, help="default 1024 on GPU, 256 on CPU")
    ap.add_argument("--dim", type=int, default=None, help="CPU model width (default 1536)")
    ap.add_argument("--layers", type=int, default=None, help="CPU model depth (default 16)")
    ap.add_argument("--cap", type=float, default=None, help="cap, GiB (default: between the predictions)")
    ap.add_argument("--uncapped", action="store_true", help="also run AdamW uncapped (its full peak)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.context is None:
        args.context = 1024 if args.part == "gpu" else 256
    if args.child:
        args.cap = int(args.cap) if args.cap else 0
        print(json.dumps(child(args)))
        return 0
    if args.part == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("tight_memory --part gpu: no CUDA device on this machine; skipped.")
            return 0
    config = _config(args.part, args.dim, args.layers)
    pred = _predicted_peaks(args.part, config, args.batch, args.context)
    # The cap sits halfway between SGD-SaI's and AdamW's predicted needs (params, grads,
    # state, estimated activations), plus a fixed allowance for what is not modelled.
    slack = GIB // 2 if args.part == "cpu" else 2 * GIB
    cap = int(args.cap * GIB) if args.cap else (pred["sgd_sai"] + pred["adamw"]) // 2 + slack
    report: dict = dict(
        part=args.part,
        config=repr(config),
        batch=args.batch,
        context=args.context,
        predicted=pred,
        cap_bytes=cap,
        runs=[],
    )
    print(
        f"model {config}\npredicted peaks (GiB): "
        + ", ".join(f"{k} {v / GIB:.2f}" for k, v in pred.items())
        + f"\ncap {cap / GIB:.2f} GiB",
        flush=True,
    )
    # Capped runs of every mode; with --uncapped also AdamW without a cap, for its full
    # measured peak (SGD-SaI's capped run trains to the end, so its peak is the full one).
    plan = [("adamw", 0)] if args.uncapped else []
    plan += [(m, cap) for m in MODES]
    for mode, c in plan:
        r = run_child(args, mode, c)
        report["runs"].append(r)
        peak = r.get("peak_bytes")
        peak_s = f"{peak / GIB:6.2f} GiB" if peak is not None else "   n/a"
        cap_s = f"cap {c / GIB:.2f} GiB" if c else "uncapped"
        print(
            f"{mode:20s} {cap_s:16s} {r['status']:14s} steps {r.get('steps_done', 0)}  "
            f"measured peak {peak_s}"
            f"  {r.get('error', '')}",
            flush=True,
        )
    by = {(r["mode"], bool(r["cap"])): r for r in report["runs"]}
    a, s = by.get(("adamw", False)), by.get(("sgd_sai", True))
    if a and s and a["status"] == s["status"] == "trained":
        diff = a["peak_bytes"] - s["peak_bytes"]
        report["uncapped_difference_bytes"] = diff
        print(
            f"AdamW (uncapped) - SGD-SaI (trained under the cap) measured peak: {diff / GIB:.2f} GiB "
            f"(one fp32 buffer: {pred['one_buffer'] / GIB:.2f} GiB)"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
