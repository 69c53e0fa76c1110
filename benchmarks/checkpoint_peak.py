"""Measured peak memory of ``sai_dist.checkpoint.save`` (and ``load``) per ``momentum_dtype``.

Issue 16 item 6: a checkpoint holds the compressed momentum (int8 codes and a table of
scale runs, bf16 as is), never a dequantized float32 copy, so saving should cost at most
the state plus one tensor above what is alive. Measured here in one process per case:

- a stack of ``--layers`` square fp32 ``nn.Linear(width, width)`` layers without biases,
  trained 2 steps with ``SGDSaI(momentum_dtype=...)`` (gradients then freed);
- baseline: the resident set right before ``save`` (interpreter, torch, parameters,
  state); peak: the kernel's high-water mark of the resident set (``VmHWM``, reset by
  ``/proc/self/clear_refs`` just before) during ``save``, likewise during ``load`` into a
  fresh model and optimizer (``load`` reads into copies by contract, so its peak is the
  model and state once more);
- large allocations are ``mmap``-ed and returned on free (glibc ``M_MMAP_THRESHOLD``
  pinned), so the resident set follows what is alive. The files go to a temporary folder
  (the page cache is not part of the resident set).

    PYTHONPATH=. python benchmarks/checkpoint_peak.py --width 2048 --layers 3 \
        --json docs/data/checkpoint_peak_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

from process_memory import pin_mmap_threshold, reset_hwm, status_kib

DTYPES = ("float32", "bfloat16", "int8")


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _state_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for k, t in st.items()
        if k in ("momentum_buffer", "momentum_scale")
    )


def measure(momentum_dtype: str, width: int, layers: int) -> dict:
    """One case, in this process."""
    pin_mmap_threshold()
    import torch
    from torch import nn

    import sai_dist
    from sai_dist import checkpoint

    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
        opt = sai_dist.SGDSaI(model.parameters(), lr=1e-3, momentum=0.9, momentum_dtype=momentum_dtype)
        return model, opt

    model, opt = build()
    x = torch.randn(8, width)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())  # one float32 tensor of a parameter
    state = _state_bytes(opt)
    with tempfile.TemporaryDirectory() as root:
        base = _rss_kib()
        reset_hwm()
        checkpoint.save(f"{root}/c", model, opt)
        save_peak = (status_kib("VmHWM") - base) * 1024
        model2, opt2 = build()
        base2 = _rss_kib()
        reset_hwm()
        checkpoint.load(f"{root}/c", model2, opt2)
        load_peak = (status_kib("VmHWM") - base2) * 1024
        same = all(
            torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
            for p, q in zip(model.parameters(), model2.parameters(), strict=True)
        )
    return {
        "momentum_dtype": momentum_dtype,
        "params_bytes": params,
        "state_bytes": state,
        "largest_fp32_tensor_bytes": largest,
        "save_peak_above_baseline_bytes": save_peak,
        "save_peak_over_state_plus_one_tensor": save_peak / (state + largest),
        "load_peak_above_baseline_bytes": load_peak,
        "loaded_state_equal": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a case, in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.width, args.layers)))
        return
    rows = []
    for md in DTYPES:
        size = ["--width", str(args.width), "--layers", str(args.layers)]
        cmd = [sys.executable, __file__, *size, "--one", md]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    mib = 2**20
    print("momentum  params MiB  state MiB  save peak MiB  peak/(state+1 tensor)  load peak MiB")
    for r in rows:
        print(
            f"{r['momentum_dtype']:9} {r['params_bytes'] / mib:10.1f} {r['state_bytes'] / mib:10.2f} "
            f"{r['save_peak_above_baseline_bytes'] / mib:14.2f} "
            f"{r['save_peak_over_state_plus_one_tensor']:22.2f} "
            f"{r['load_peak_above_baseline_bytes'] / mib:14.2f}"
        )
    if args.json:
        out = {"width": args.width, "layers": args.layers, "torch_threads": 1, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
