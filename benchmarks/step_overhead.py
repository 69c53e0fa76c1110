"""What a step costs around its kernels: the optimizer's per-tensor Python.

``--tensors`` tensors of ``--numel`` elements each (default 146 of 4096: GPT-2 small's
tensor count, each so small that the kernels' own work is a few microseconds a step), one
steady ``SGDSaI.step()`` timed ``--repeats`` times, median, for float32 state and each
low-precision combination, interleaved in one process (A B C ... A B C ...). What is left
is the per-tensor bookkeeping of ``sai_dist.update.step_group`` and
``sai_dist.functional`` plus one kernel call per group.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/step_overhead.py [--write out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from sai_dist import SGDSaI

#: (parameter dtype, momentum_dtype) of each case.
CASES = {
    "fp32_state": (torch.float32, None),
    "int8_momentum": (torch.float32, "int8"),
    "bf16_momentum": (torch.float32, "bfloat16"),
    "bf16_params_int8_momentum": (torch.bfloat16, "int8"),
    "bf16_params_bf16_momentum": (torch.bfloat16, "bfloat16"),
}


def _stepper(
    dtype: torch.dtype, momentum_dtype: str | None, tensors: int, numel: int
) -> Callable[[], object]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, generator=gen).to(dtype)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(numel, generator=gen).to(dtype)
    opt = SGDSaI(params, lr=1e-3, momentum=0.9, weight_decay=0.01, momentum_dtype=momentum_dtype)
    opt.step()  # g-SNR and buffers: the steady step is timed
    return opt.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=146)
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--write", help="JSON results")
    args = parser.parse_args()
    steps = {name: _stepper(d, m, args.tensors, args.numel) for name, (d, m) in CASES.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    result = {
        "tensors": args.tensors,
        "numel": args.numel,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "step_us": {name: statistics.median(t) * 1e6 for name, t in times.items()},
    }
    for name, us in result["step_us"].items():
        print(f"{name:28s} {us:8.0f} us a step = {us / args.tensors:5.1f} us a tensor")
    if args.write:
        with open(args.write, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
