"""How close an SGD-SaI step comes to the memory-bandwidth limit.

For a GPT-shaped list of tensors this times, in one process on one device:

- ``copy``: ``dst.copy_(src)`` over the same elements, the device's practical bandwidth
  (bytes read + written per second);
- SGD-SaI's step (foreach and single-tensor paths), torch's SGD with momentum and AdamW
  (foreach, and fused where the device has it).

An SGD-SaI step must at least read p, g, m and write p, m: 20 bytes per fp32 element. The
report gives each step's time, its effective bandwidth against that minimum, and its ratio
to the ideal time (minimum bytes / copy bandwidth).

    python benchmarks/step_speed.py [--device cuda] [--params 50e6] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sai_dist import SGDSaI


def gpt_shapes(total: float, width: int = 768) -> list[tuple[int, ...]]:
    """Shapes of a GPT-like model (embedding, per-layer matrices and vectors) of about
    ``total`` parameters."""
    shapes: list[tuple[int, ...]] = [(50304, width), (1024, width)]
    per_layer = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
    per_layer += [(width,), (width,), (3 * width,), (4 * width,)]
    size = lambda s: int(torch.tensor(s).prod())
    while sum(size(s) for s in shapes) < total:
        shapes.extend(per_layer)
    return shapes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, repeats: int) -> float:
    fn()
    fn()  # warm up: buffers exist, g-SNR fixed
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(n: int, device: torch.device, repeats: int) -> float:
    """Bytes read plus written per second by ``dst.copy_(src)`` over ``n`` fp32 elements."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * n / timeit(lambda: dst.copy_(src), device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = gpt_shapes(args.params)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)

    bandwidth = copy_bandwidth(n, device, args.repeats)

    candidates = {
        "sgdsai (foreach)": lambda ps: SGDSaI(ps, lr=1e-3, foreach=True),
        "sgdsai (single-tensor)": lambda ps: SGDSaI(ps, lr=1e-3, foreach=False),
        "sgdsai (fused)": lambda ps: SGDSaI(ps, lr=1e-3, fused=True),
        "torch SGD momentum (foreach)": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    }
    if device.type == "cuda":
        candidates["torch AdamW (fused)"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)
    minimum_bytes = 20 * n  # read p, g, m; write p, m
    rows = []
    for name, make in candidates.items():
        opt = make(params)
        t = timeit(opt.step, device, args.repeats)
        rows.append(
            {
                "optimizer": name,
                "ms": t * 1e3,
                "effective_GBps": minimum_bytes / t / 1e9,
                "x_ideal": t / (minimum_bytes / bandwidth),
            }
        )
        del opt
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "tensors": len(params),
        "elements": n,
        "copy_GBps": bandwidth / 1e9,
        "ideal_sgdsai_ms": minimum_bytes / bandwidth * 1e3,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['device_name']}: {len(params)} tensors, {n / 1e6:.1f} M fp32 elements, "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, ideal SGD-SaI step {result['ideal_sgdsai_ms']:.2f} ms"
    )
    print(f"{'optimizer':<30} {'ms/step':>9} {'GB/s (20 B/elem)':>17} {'x ideal':>8}")
    for r in rows:
        print(f"{r['optimizer']:<30} {r['ms']:>9.2f} {r['effective_GBps']:>17.1f} {r['x_ideal']:>8.2f}")


if __name__ == "__main__":
    main()
