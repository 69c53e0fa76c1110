"""The low-precision C kernel's own rate: ns per element of one piece, no optimizer around it.

One piece of ``--numel`` elements (default 98,304: about 2 MB of state, in a core's L2, so
the figure is the kernel's arithmetic, not memory) stepped by ``native_lowp.Batch``
directly: ``--repeats`` rounds, each case in turn (A B C ... A B C ...) warmed by one step
and then timed over ``--inner`` steps, median over the rounds, on ``--threads`` threads.
With ``--numel`` far beyond the caches it is the kernel's rate from memory instead. Where
the step benchmark (``step_speed.py --parts lowp``) finds a case slower than its bytes
allow, this says whether arithmetic is why.

``--against REV`` also builds the kernel source of git revision ``REV`` (for the same
instruction set), checks that it writes the same bits as this tree's on pieces with tails,
NaN and infinity, born and not, and times both on the same tensors in the same rounds
(A B A B ...): an A/B of a kernel change measured in one process.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/kernel_rate.py [--against REV] [--write out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sai_dist import native_lowp
from sai_dist.functional import _coefficients
from sai_dist.momentum import BLOCK, Rounding, num_scales

#: (parameter dtype, buffer dtype) of each case, as in step_overhead.py's cases.
CASES = {
    "fp32_state": (torch.float32, torch.float32),
    "int8_momentum": (torch.float32, torch.int8),
    "bf16_momentum": (torch.float32, torch.bfloat16),
    "bf16_params_int8_momentum": (torch.bfloat16, torch.int8),
    "bf16_params_bf16_momentum": (torch.bfloat16, torch.bfloat16),
}


#: One piece's tensors: p, g, the momentum buffer (None: no momentum), the int8 scales.
_Piece = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]

_, _COEF = _coefficients(0.8, False, lr=1e-3, momentum=0.9, weight_decay=0.01, maximize=False)


def _tensors(param_dtype: torch.dtype, buf_dtype: torch.dtype | None, n: int, seed: int = 0) -> _Piece:
    """``[p, g, m or None, scales or None]`` of one piece of ``n`` elements (``buf_dtype``
    ``None``: no momentum)."""
    gen = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, generator=gen) * 0.02).to(param_dtype)
    g = (torch.randn(n, generator=gen) * 1e-3).to(param_dtype)
    if buf_dtype is None:
        return p, g, None, None
    if buf_dtype == torch.int8:
        m = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
        scales: torch.Tensor | None = torch.full((num_scales([n]),), 1e-5)
    else:
        m, scales = (torch.randn(n, generator=gen) * 1e-3).to(buf_dtype), None
    return p, g, m, scales


def _step(lib: ctypes.CDLL, piece: _Piece, step: int, born: bool = False, round_param: bool = True) -> None:
    batch = native_lowp.Batch(lib)
    p, g, m, scales = piece
    rounding = Rounding(1, step, 0, 0)
    batch.add(p, g, m, scales, born=born, coef=_COEF, rounding=rounding, round_param=round_param)
    batch.run()


def _stepper(lib: ctypes.CDLL, piece: _Piece) -> Callable[[], None]:
    step = [0]

    def run() -> None:
        step[0] += 1  # a new step's draws, as training has
        _step(lib, piece, step[0])

    return run


def _source_at(rev: str) -> str:
    """The kernel's C source as ``sai_dist/native_lowp.py`` at git revision ``rev`` has it.

    That module's top level is run (its imports, from this tree's package, and its
    definitions) to evaluate the source string. Exits naming ``rev`` when git cannot show
    it, when it does not run against this tree, or when its row layout (the C struct this
    tree's ``Batch`` packs) differs from this tree's: such a kernel would misread the rows."""
    try:
        text = subprocess.run(
            ["git", "show", f"{rev}:sai_dist/native_lowp.py"],
            cwd=Path(__file__).resolve().parent.parent,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"kernel_rate --against {rev}: git cannot show its native_lowp.py ({exc})") from exc
    namespace: dict[str, object] = {"__name__": "native_lowp_at_" + rev}
    try:
        exec(compile(text, f"{rev}:sai_dist/native_lowp.py", "exec"), namespace)
    except Exception as exc:
        raise SystemExit(f"kernel_rate --against {rev}: its native_lowp.py fails here ({exc!r})") from exc
    row = namespace.get("_ROW")
    if not isinstance(row, struct.Struct) or row.format != native_lowp._ROW.format:
        raise SystemExit(f"kernel_rate --against {rev}: its kernel's row layout differs from this tree's")
    return str(namespace["_SOURCE"])


def _same_bits(a: ctypes.CDLL, b: ctypes.CDLL) -> dict[str, bool]:
    """Per case: whether kernels ``a`` and ``b`` write the same bytes over a born step and a
    later one, on a piece with a vector tail, a scalar tail, a NaN and an infinity, a bf16
    parameter rounded stochastically and to nearest, and (``no_momentum_*``) with no buffer.
    The coefficients are finite: with a NaN coefficient only the NaN payloads could differ
    (x86 keeps the first operand's, and the compiler may order a product's operands)."""
    cases = {
        name if rp else f"{name}[nearest]": (pd, bd, rp)
        for name, (pd, bd) in CASES.items()
        for rp in (True, False)
    }
    cases |= {"no_momentum_fp32_params": (torch.float32, None, True)}
    cases |= {"no_momentum_bf16_params": (torch.bfloat16, None, True)}
    same = {}
    n = 3 * BLOCK + 53
    for name, (param_dtype, buf_dtype, round_param) in cases.items():
        out = []
        for lib in (a, b):
            piece = _tensors(param_dtype, buf_dtype, n, seed=1)
            piece[1][n // 2] = float("nan")
            piece[1][BLOCK + 3] = float("inf")
            _step(lib, piece, 1, born=True, round_param=round_param)
            _step(lib, piece, 2, round_param=round_param)
            out.append([t.view(torch.uint8) if t.dtype != torch.int8 else t for t in piece if t is not None])
        same[name] = all(torch.equal(x, y) for x, y in zip(*out, strict=True))
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=96 * 1024)
    parser.add_argument("--repeats", type=int, default=100, help="interleaved rounds")
    parser.add_argument("--inner", type=int, default=20, help="timed steps of a case in a round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", metavar="REV", help="git revision whose kernel to time beside this one")
    parser.add_argument("--write", help="JSON results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = native_lowp.library()
    if lib is None:
        raise SystemExit(f"kernel_rate: no native low-precision kernel ({native_lowp._reason})")
    kernels = {"": lib}
    if args.against:
        other = native_lowp._load(native_lowp.isa_flags(), _source_at(args.against), "sai_lowp_against")
        if other is None:
            raise SystemExit(
                f"kernel_rate: the kernel of {args.against} did not build ({native_lowp._reason})"
            )
        kernels[args.against] = other
    steps = {}
    for name, (pd, bd) in CASES.items():
        piece = _tensors(pd, bd, args.numel)  # both kernels step the same tensors
        for rev, kernel in kernels.items():
            steps[(name, rev)] = _stepper(kernel, piece)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            step()  # brings this case's piece back into cache (the others evicted it)
            t0 = time.perf_counter()
            for _ in range(args.inner):
                step()
            times[key].append((time.perf_counter() - t0) / args.inner)

    def rates(rev: str) -> dict[str, float]:
        return {name: statistics.median(times[(name, rev)]) / args.numel * 1e9 for name in CASES}

    ns = rates("")
    report: dict[str, object] = {
        "numel": args.numel,
        "repeats": args.repeats,
        "inner": args.inner,
        "threads": args.threads,
        "kernel_flags": list(native_lowp.isa_flags()),
        "ns_per_element": ns,
        "vs_fp32_state": {name: v / ns["fp32_state"] for name, v in ns.items()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.against:
        theirs = rates(args.against)
        report["against"] = {
            "rev": args.against,
            "same_bits": _same_bits(lib, kernels[args.against]),
            "ns_per_element": theirs,
            "this_vs_against": {name: ns[name] / theirs[name] for name in CASES},
        }
    print(json.dumps(report, indent=1))
    if args.write:
        with open(args.write, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
