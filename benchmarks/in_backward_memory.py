"""Measured peak memory of SGD-SaI trained normally against in-backward, on CPU.

Three modes: ``normal`` (``backward()`` then ``step()``), ``in_backward`` (the
optimizer-in-backward default, ``first_step="keep"``: step 1 keeps the gradients until the
first backward ends) and ``two_pass`` (``first_step="two_pass"``: step 1 records the
block moments in a first backward and updates in a second; its two passes are measured
apart).

Method: each mode runs in a fresh subprocess; the peak is the kernel's high-water mark of
resident memory (``VmHWM`` in ``/proc/self/status``, what ``getrusage().ru_maxrss``
reports), minus the resident size right after the model, its data and a warm-up forward
exist (the baseline: interpreter, torch, parameters). Step 1 and the later steps are
measured apart: writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark
after step 1 (Linux >= 4.0). The model is a stack of
square fp32 ``nn.Linear`` layers without biases (each layer one block), so one gradient
copy is exactly the parameter bytes. Large allocations are freshly ``mmap``-ed and
returned to the kernel on free (glibc, ``M_MMAP_THRESHOLD`` pinned), so RSS follows what
is alive.

    PYTHONPATH=. python benchmarks/in_backward_memory.py --width 2048 --layers 12
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from process_memory import pin_mmap_threshold, reset_hwm

MODES = ("normal", "in_backward", "two_pass")


def _rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_mode(mode: str, width: int, layers: int, steps: int, opt_kw: dict) -> dict:
    if mode == "two_pass":
        return run_two_pass(width, layers, steps, opt_kw)
    pin_mmap_threshold()
    import torch
    from torch import nn

    from sai_dist import SGDSaI
    from sai_dist.in_backward import InBackwardSGDSaI

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    x = torch.randn(8, width)
    model(x).square().mean()  # warm up kernels and the allocator outside the measurement
    if mode == "normal":
        opt = SGDSaI(model.parameters(), lr=1e-3, **opt_kw)
    else:
        runner = InBackwardSGDSaI(model.parameters(), lr=1e-3, **opt_kw)
        opt = runner.optimizer
    baseline = _rss_now_kib()
    reset_hwm()
    peaks = []
    for _ in range(steps):
        loss = model(x).square().mean()
        loss.backward()
        if mode == "normal":
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not peaks:
            peaks.append(_hwm_kib())
            reset_hwm()
    peaks.append(_hwm_kib())
    checksum = float(sum(p.double().sum() for p in model.parameters()))
    return dict(
        baseline_kib=baseline,
        step1_over_baseline=(peaks[0] - baseline) * 1024,
        peak_over_baseline=(peaks[1] - baseline) * 1024,
        checksum=checksum,
    )


def run_two_pass(width: int, layers: int, steps: int, opt_kw: dict) -> dict:
    """``first_step="two_pass"`` through ``runner.step(closure)``; VmHWM per phase: step 1's
    pass 1 (moments only) and pass 2 (first update) apart, then the later steps."""
    pin_mmap_threshold()
    import torch
    from torch import nn

    from sai_dist.in_backward import InBackwardSGDSaI

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    x = torch.randn(8, width)
    model(x).square().mean()
    runner = InBackwardSGDSaI(model.parameters(), lr=1e-3, first_step="two_pass", **opt_kw)
    baseline = _rss_now_kib()
    phases: list[int] = []

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        phases.append(_hwm_kib())  # one entry per pass of the closure
        reset_hwm()
        return loss

    reset_hwm()
    for _ in range(steps):
        runner.step(closure)
    checksum = float(sum(p.double().sum() for p in model.parameters()))
    over = [(kib - baseline) * 1024 for kib in phases]
    return dict(
        baseline_kib=baseline,
        pass1_over_baseline=over[0],
        pass2_over_baseline=over[1],
        step1_over_baseline=max(over[0], over[1]),
        peak_over_baseline=max(over[2:]),
        closure_runs=len(phases),
        checksum=checksum,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument(
        "--momentum-dtype", help="passed to SGDSaI as momentum_dtype (needs the low-precision state support)"
    )
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    opt_kw: dict = {"momentum": args.momentum}
    if args.momentum_dtype:
        opt_kw["momentum_dtype"] = args.momentum_dtype
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.width, args.layers, args.steps, opt_kw)))
        return 0
    param_bytes = 4 * args.width * args.width * args.layers
    result = dict(
        param_bytes=param_bytes, largest_block_bytes=4 * args.width * args.width, steps=args.steps, **opt_kw
    )
    for mode in args.modes:
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--width",
            str(args.width),
            "--layers",
            str(args.layers),
            "--steps",
            str(args.steps),
            "--momentum",
            str(args.momentum),
            *(["--momentum-dtype", args.momentum_dtype] if args.momentum_dtype else []),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    saved = None
    if "normal" in result and "in_backward" in result:
        saved = result["normal"]["peak_over_baseline"] - result["in_backward"]["peak_over_baseline"]
        result["saved_bytes"] = saved
    if args.json:
        print(json.dumps(result))
    else:
        mib = 1 << 20
        print(
            f"model: {args.layers} x Linear({args.width}, {args.width}), "
            f"one gradient copy {param_bytes / mib:.1f} MiB, "
            f"largest block {result['largest_block_bytes'] / mib:.1f} MiB, {opt_kw}"
        )
        for mode in args.modes:
            r = result[mode]
            passes = ""
            if mode == "two_pass":
                p1, p2 = r["pass1_over_baseline"] / mib, r["pass2_over_baseline"] / mib
                passes = f" (pass 1 {p1:.1f}, pass 2 {p2:.1f})"
            step1 = r["step1_over_baseline"] / mib
            print(
                f"{mode:12s} peak RSS over baseline: step 1 {step1:7.1f} MiB{passes}, "
                f"steps 2-{args.steps} {r['peak_over_baseline'] / mib:7.1f} MiB  "
                f"(checksum {r['checksum']:.6f})"
            )
        if saved is not None:
            print(f"saved after step 1: {saved / mib:.1f} MiB = {saved / param_bytes:.3f} gradient copies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
