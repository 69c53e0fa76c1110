"""The low-precision C kernel's own rate: ns per element of one piece, no optimizer around it.

One piece of ``--numel`` elements (default 98,304: about 2 MB of state, in a core's L2, so
the figure is the kernel's arithmetic, not memory) stepped by ``native_lowp.Batch``
directly: ``--repeats`` rounds, each case in turn (A B C ... A B C ...) warmed by one step
and then timed over ``--inner`` steps, median over the rounds, on ``--threads`` threads.
With ``--numel`` far beyond the caches it is the kernel's rate from memory instead. Where
the step benchmark (``step_speed.py --parts lowp``) finds a case slower than its bytes
allow, this says whether arithmetic is why.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/kernel_rate.py [--write out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from sai_dist import native_lowp
from sai_dist.functional import _coefficients
from sai_dist.momentum import Rounding, num_scales

#: (parameter dtype, buffer dtype) of each case, as in step_overhead.py's cases.
CASES = {
    "fp32_state": (torch.float32, torch.float32),
    "int8_momentum": (torch.float32, torch.int8),
    "bf16_momentum": (torch.float32, torch.bfloat16),
    "bf16_params_int8_momentum": (torch.bfloat16, torch.int8),
    "bf16_params_bf16_momentum": (torch.bfloat16, torch.bfloat16),
}


def _stepper(lib: object, param_dtype: torch.dtype, buf_dtype: torch.dtype, n: int) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(n, generator=gen) * 0.02).to(param_dtype)
    g = (torch.randn(n, generator=gen) * 1e-3).to(param_dtype)
    if buf_dtype == torch.int8:
        m = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
        scales = torch.full((num_scales([n]),), 1e-5)
    else:
        m, scales = (torch.randn(n, generator=gen) * 1e-3).to(buf_dtype), None
    _, coef = _coefficients(0.8, False, lr=1e-3, momentum=0.9, weight_decay=0.01, maximize=False)
    step = [0]

    def run() -> None:
        step[0] += 1  # a new step's draws, as training has
        batch = native_lowp.Batch(lib)  # type: ignore[arg-type]
        batch.add(
            p, g, m, scales, born=False, coef=coef, rounding=Rounding(1, step[0], 0, 0), round_param=True
        )
        batch.run()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=96 * 1024)
    parser.add_argument("--repeats", type=int, default=100, help="interleaved rounds")
    parser.add_argument("--inner", type=int, default=20, help="timed steps of a case in a round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", help="JSON results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = native_lowp.library()
    if lib is None:
        raise SystemExit(f"kernel_rate: no native low-precision kernel ({native_lowp._reason})")
    steps = {name: _stepper(lib, pd, bd, args.numel) for name, (pd, bd) in CASES.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            step()  # brings this case's piece back into cache (the others evicted it)
            t0 = time.perf_counter()
            for _ in range(args.inner):
                step()
            times[name].append((time.perf_counter() - t0) / args.inner)
    ns = {name: statistics.median(t) / args.numel * 1e9 for name, t in times.items()}
    report = {
        "numel": args.numel,
        "repeats": args.repeats,
        "inner": args.inner,
        "threads": args.threads,
        "kernel_flags": list(native_lowp.isa_flags()),
        "ns_per_element": ns,
        "vs_fp32_state": {name: v / ns["fp32_state"] for name, v in ns.items()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(report, indent=1))
    if args.write:
        with open(args.write, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
