"""How close an SGD-SaI step comes to the memory-bandwidth limit, and what step 1 costs.

Everything timed runs in this one process, in interleaved rounds (A B C ... A B C ...), and
the report gives medians and ratios, which hold on a shared machine where absolute times
do not. The load average is recorded before and after.

Parts (all on by default except the 1B set and the end-to-end job):

``step``
    On a shape set (``gpt2-small``: GPT-2 small's 148 parameter tensors, 124.4 M fp32
    elements; ``1b``: a GPT of 1.01 B elements, opt-in), one steady step of SGD-SaI
    (momentum 0.9, weight decay 0.01, default ``fused=None``: the single-pass kernel),
    SGD-SaI's foreach path, ``torch.optim.SGD(momentum=0.9, fused=True)`` (weight decay 0)
    and ``torch.optim.AdamW(fused=True)``, next to a STREAM-style triad ``c = a + 3 b``
    (12 bytes per element) and a copy (8 bytes per element) over as many elements. Achieved
    bandwidth of a step counts its minimum traffic: 20 bytes per element for SGD-SaI and
    momentum SGD, 28 for AdamW.
``first``
    SGD-SaI's first step (g-SNR statistics, buffer allocation, the step) on a fresh
    optimizer against the steady step, interleaved; and the statistics alone.
``collectives``
    On 2 gloo ranks, a 12-layer GPT (148 parameter tensors) under FSDP2: collectives issued
    by ``opt.step()`` at steps 1-3 (counted by tests/support/collectives.py).
``lowp`` (opt-in: ``--parts lowp``)
    Low-precision state (:mod:`sai_dist.momentum`) on the first ``--lowp-layers`` layers of
    GPT-2 small's shapes (7.1 M elements a layer; the embeddings are left out so the run
    stays within a shared machine's memory), interleaved: the fp32-state step against int8
    and bf16 momentum with fp32 parameters, and bf16 parameters and gradients with int8
    and bf16 momentum (stochastic rounding). Minimum traffic per element: 20 bytes fp32,
    16 bf16 momentum, 14 int8 momentum (+4 per 2048), 8 bf16 parameters with int8, 12 with
    bf16 momentum; achieved bytes/element are reported against the triad's.
    ``--lowp-builds avx512,avx2,0`` times the kernel's builds (``SAI_DIST_LOWP_SIMD``) side
    by side in the same rounds; the part runs once per ``--threads`` count (a list in the
    JSON). 12 layers (85 M elements, 1.7 GB of fp32-state traffic a step) by default: far
    out of every cache, as a real model's state is; all cases are held at once (7.1 GB
    with two builds; skipped, saying so, where memory is short). With ``--device cuda``
    the builds are the compiled kernel (:mod:`sai_dist.compiled_lowp`, ``fused=None``) and
    the torch reference path (``fused=False``), side by side in the same rounds.
``e2e`` (``--e2e``)
    ``python -m sai_dist.train`` (FSDP2, 2 ranks, CPU) with SGD-SaI and with AdamW,
    alternated, median tokens/s over the timed steps.

On CUDA (``--device cuda``) the copy bandwidth (``dst.copy_(src)``) is the reference and
the 1B set is the default; the report gives the step's achieved bandwidth as a fraction
of it.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/step_speed.py            # GPT-2 small, CPU
    PYTHONPATH=. python benchmarks/step_speed.py --set 1b --parts step       # needs ~18 GiB
    PYTHONPATH=. python benchmarks/step_speed.py --e2e \
        --write docs/data/step_speed_cpu.json --plot docs/step_speed.png
    PYTHONPATH=. python benchmarks/step_speed.py --device cuda --write docs/data/step_speed_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sai_dist import SGDSaI, functional
from sai_dist.layouts import auto_layout
from sai_dist.stats import reduce_block_moments

GiB = 1 << 30


# -- shape sets ------------------------------------------------------------------------------


def gpt_shapes(vocab: int, positions: int, width: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model (tied head): token and position embeddings,
    per layer ln_1 (w, b), attn c_attn (w, b), attn c_proj (w, b), ln_2 (w, b), mlp c_fc
    (w, b), mlp c_proj (w, b); final ln_f (w, b)."""
    d = width
    shapes: list[tuple[int, ...]] = [(vocab, d), (positions, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,)]
        shapes += [(4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [*shapes, (d,), (d,)]


SHAPE_SETS: dict[str, list[tuple[int, ...]]] = {
    # GPT-2 small (Radford et al. 2019, HF "gpt2"): 124,439,808 parameters in 148 tensors.
    "gpt2-small": gpt_shapes(50257, 1024, 768, 12),
    # A 1.01 B-parameter GPT of the same family: width 2048, 18 layers.
    "1b": gpt_shapes(50257, 1024, 2048, 18),
}


def numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(int(torch.Size(s).numel()) for s in shapes)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# -- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in rounds A B C ... so that a change of
    machine load hits every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            # Released outside the timed region: what a call returns (a first step's
            # optimizer with its fresh buffers) lives on in a real run, and freeing 0.5 GB
            # is not part of any step.
            del out
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``): ratios of compute-bound cases differ by
    CPU, so a result names the one it was measured on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- parts -------------------------------------------------------------------------------------


def make_params(shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, device=device).normal_(0, 0.02, generator=gen))
        p.grad = torch.empty(s, device=device).normal_(0, 1e-3, generator=gen)
        params.append(p)
    return params


def step_part(
    params: list[torch.nn.Parameter], device: torch.device, repeats: int, with_first: bool
) -> dict[str, Any]:
    n = sum(p.numel() for p in params)
    budget = available_bytes(device) - 2 * GiB  # headroom for everyone else on the machine
    probe = min(n, 1 << 27)  # triad/copy arrays: far beyond any cache, capped at 512 MiB each
    candidates: list[tuple[str, int, Callable[[], Callable[[], Any]]]] = [
        ("sgdsai", 4 * n, lambda: SGDSaI(params, lr=1e-3, momentum=0.9, weight_decay=0.01).step),
        (
            "torch_sgd_fused",
            4 * n,
            lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=0.0, fused=True).step,
        ),
        ("torch_adamw_fused", 8 * n, lambda: torch.optim.AdamW(params, lr=1e-3, fused=True).step),
        (
            "sgdsai_foreach",
            4 * n,
            lambda: SGDSaI(params, lr=1e-3, momentum=0.9, weight_decay=0.01, fused=False, foreach=True).step,
        ),
    ]
    a = torch.randn(probe, device=device)
    b = torch.randn(probe, device=device)
    c = torch.empty(probe, device=device)
    budget -= 12 * probe
    fns: dict[str, Callable[[], Any]] = {
        "triad": lambda: torch.add(a, b, alpha=3.0, out=c),
        "copy": lambda: c.copy_(a),
    }
    skipped = {}
    for name, cost, make in candidates:
        if cost > budget:
            skipped[name] = f"needs {cost / GiB:.1f} GiB more than available"
            continue
        budget -= cost
        fns[name] = make()
    first_fn = None
    if with_first and budget > 4 * n:
        steady = fns["sgdsai"]

        def first() -> SGDSaI:
            # A fresh optimizer's first step: statistics (2 passes), buffer allocation, step.
            opt = SGDSaI(params, lr=1e-3, momentum=0.9, weight_decay=0.01)
            opt.step()
            return opt

        def sgd_first() -> torch.optim.SGD:
            # torch's first step pays the same buffer allocation (first touch of new memory).
            opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)
            opt.step()
            return opt

        first_fn = first
        layout = auto_layout(params)
        layout.register(params)
        fns["sgdsai_first"] = first_fn
        if "torch_sgd_fused" in fns:
            fns["torch_sgd_fused_first"] = sgd_first
        fns["gsnr_statistics"] = lambda: reduce_block_moments(layout.sources(params), layout.num_blocks, None)
        del steady
    elif with_first:
        skipped["sgdsai_first"] = "not enough memory for a second momentum buffer"
    before = load()
    times = interleaved(fns, device, repeats)
    after = load()
    ms = {k: median_ms(v) for k, v in times.items()}
    triad_GBps = 12 * probe / (ms["triad"] / 1e3) / 1e9
    copy_GBps = 8 * probe / (ms["copy"] / 1e3) / 1e9
    traffic = {"sgdsai": 20, "sgdsai_foreach": 20, "torch_sgd_fused": 20, "torch_adamw_fused": 28}
    rows = {}
    for name, t in ms.items():
        row: dict[str, float] = {"ms": t, "ms_spread": [1e3 * min(times[name]), 1e3 * max(times[name])]}
        if name in traffic:
            gbps = traffic[name] * n / (t / 1e3) / 1e9
            row.update(GBps=gbps, x_triad_bw=gbps / triad_GBps, x_copy_bw=gbps / copy_GBps)
        rows[name] = row
    ratios = {}
    if "torch_sgd_fused" in ms:
        ratios["sgdsai_vs_sgd_fused"] = ms["sgdsai"] / ms["torch_sgd_fused"]
        if "sgdsai_foreach" in ms:
            ratios["sgdsai_foreach_vs_sgd_fused"] = ms["sgdsai_foreach"] / ms["torch_sgd_fused"]
    if "torch_adamw_fused" in ms:
        ratios["sgdsai_vs_adamw_fused"] = ms["sgdsai"] / ms["torch_adamw_fused"]
        if "torch_sgd_fused" in ms:
            ratios["adamw_fused_vs_sgd_fused"] = ms["torch_adamw_fused"] / ms["torch_sgd_fused"]
    if "sgdsai_first" in ms:
        ratios["first_vs_steady"] = ms["sgdsai_first"] / ms["sgdsai"]
        ratios["statistics_vs_steady"] = ms["gsnr_statistics"] / ms["sgdsai"]
        if "torch_sgd_fused_first" in ms:
            ratios["torch_sgd_fused_first_vs_steady"] = ms["torch_sgd_fused_first"] / ms["torch_sgd_fused"]
    # Per-round ratios: their spread says how much the load moved the medians above.
    per_round = [
        s / f for s, f in zip(times["sgdsai"], times.get("torch_sgd_fused", times["sgdsai"]), strict=True)
    ]
    del fns
    gc.collect()
    return {
        "elements": n,
        "tensors": len(params),
        "probe_elements": probe,
        "triad_GBps": triad_GBps,
        "copy_GBps": copy_GBps,
        "rows": rows,
        "ratios": ratios,
        "sgdsai_vs_sgd_fused_per_round": [min(per_round), max(per_round)],
        "skipped": skipped,
        "loadavg_before": before,
        "loadavg_after": after,
    }


def lowp_part(
    layers: int, repeats: int, builds: list[str] | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """The low-precision cases interleaved with the fp32-state step and a triad. ``builds``:
    ``SAI_DIST_LOWP_SIMD`` values (``avx512``, ``avx2``, ``0``) to time the kernel cases
    under, each its own set of cases in the same rounds (default: the default build only).
    On CUDA (``device``) ``builds`` is ignored: the two "builds" are the compiled kernel
    (``fused=None``) and the torch reference (``fused=False``,
    ``functional._low_precision_sgd_sai``'s loop)."""
    from sai_dist import compiled_lowp, native_lowp

    device = torch.device("cpu") if device is None else device

    shapes = gpt_shapes(50257, 1024, 768, layers)[2:]  # no embeddings
    n = numel(shapes)
    # name: (param dtype, momentum_dtype, minimum bytes per element)
    cases = {
        "fp32_state": (torch.float32, None, 20.0),
        "int8_momentum": (torch.float32, "int8", 14.0 + 4 / 2048),
        "bf16_momentum": (torch.float32, "bfloat16", 16.0),
        "bf16_params_int8_momentum": (torch.bfloat16, "int8", 8.0 + 4 / 2048),
        "bf16_params_bf16_momentum": (torch.bfloat16, "bfloat16", 12.0),
    }
    before = os.environ.get("SAI_DIST_LOWP_SIMD")
    default = before if before is not None else "avx512"
    # CUDA: SGDSaI's fused argument per "build" (the SIMD choice is a CPU matter).
    cuda_builds = {"compiled": None, "reference": False}
    builds = (builds or [default]) if device.type == "cpu" else list(cuda_builds)
    # Bytes per element held at once: the fp32 case (p, g, m: 12), per build the four
    # low-precision cases (9 + 10 + 5 + 6), and the triad's three arrays (12).
    need = (12 + 30 * len(builds) + 12) * n
    if need > available_bytes(device) - 2 * GiB:
        print(f"[lowp, {layers} layers] skipped: needs at least {need / GiB:.1f} GiB", file=sys.stderr)
        return {"layers": layers, "skipped": f"needs at least {need / GiB:.1f} GiB"}
    kernel: dict[str, Any] = {}
    for build in builds if device.type == "cpu" else []:
        os.environ["SAI_DIST_LOWP_SIMD"] = build
        kernel[build] = {"flags": list(native_lowp.isa_flags()), "lanes": native_lowp.lanes()}

    def use_build(build: str) -> None:
        if device.type == "cpu":  # which kernel build this case runs (CUDA: not a SIMD choice)
            os.environ["SAI_DIST_LOWP_SIMD"] = build

    def stepper(opt: SGDSaI, build: str) -> Callable[[], Any]:
        def step() -> None:
            use_build(build)
            opt.step()

        return step

    labelled: dict[str, tuple[torch.dtype, str | None, float]] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name, (dtype, momentum_dtype, nbytes) in cases.items():
        for build in builds if momentum_dtype is not None else [default]:
            label = name if len(builds) == 1 or momentum_dtype is None else f"{name}[{build}]"
            params = make_params(shapes, device)
            for p in params:
                p.data = p.data.to(dtype)
                p.grad = p.grad.to(dtype)
            fused = cuda_builds.get(build) if device.type == "cuda" else None
            opt = SGDSaI(
                params, lr=1e-3, momentum=0.9, weight_decay=0.01, momentum_dtype=momentum_dtype, fused=fused
            )
            use_build(build)
            opt.step()  # g-SNR and buffers: the steady step is timed
            fns[label] = stepper(opt, build)
            labelled[label] = (dtype, momentum_dtype, nbytes)
    a, b, c = torch.randn(n, device=device), torch.randn(n, device=device), torch.empty(n, device=device)
    fns["triad"] = lambda: torch.add(a, b, alpha=3.0, out=c)
    load_before = load()
    times = interleaved(fns, device, repeats)
    load_after = load()
    if before is None:
        os.environ.pop("SAI_DIST_LOWP_SIMD", None)
    else:
        os.environ["SAI_DIST_LOWP_SIMD"] = before
    ms = {k: median_ms(v) for k, v in times.items()}
    triad_gbs = 12 * n / (ms["triad"] / 1e3) / 1e9
    out: dict[str, Any] = {
        "elements": n,
        "layers": layers,
        "repeats": repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "kernel_builds": kernel,
        # CUDA: why the compiled kernel is not used (the "compiled" cases then ran the reference).
        "compiled_kernel": None if device.type == "cpu" else (compiled_lowp.failure(device) or "available"),
        "load_before": load_before,
        "load_after": load_after,
        "triad_GBps": triad_gbs,
        "cases": {},
    }
    for name, (_, _, nbytes) in labelled.items():
        gbs = nbytes * n / (ms[name] / 1e3) / 1e9
        out["cases"][name] = {
            "ms": ms[name],
            "ratio_to_fp32_state": ms[name] / ms["fp32_state"],
            "min_bytes_per_element": nbytes,
            "achieved_GBps": gbs,
            "fraction_of_triad": gbs / triad_gbs,
            # Time per element at the triad's bandwidth, in bytes: what the step really costs.
            "effective_bytes_per_element": ms[name] / 1e3 * triad_gbs * 1e9 / n,
        }
    return out


def _count_collectives(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    from sai_dist.train.model import GPT, GPTConfig
    from tests.support.collectives import CollectiveCounter

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=12, d_model=64, n_heads=4, seq_len=32, vocab_size=256))
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = SGDSaI(model.parameters(), lr=0.1)
    counts = []
    for step in range(3):
        tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(step))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        with CollectiveCounter() as counter:
            opt.step()
        counts.append(dict(counter.counts))
        opt.zero_grad()
    return {"tensors": len(list(model.parameters())), "per_step": counts}


def collectives_part() -> dict[str, Any]:
    from tests.support.ranks import run_ranks

    out = run_ranks(_count_collectives, 2, timeout=300)[0]
    out["world"] = 2
    out["backend"] = "gloo, FSDP2"
    return out


def e2e_part(repeats: int, steps: int) -> dict[str, Any]:
    """Alternate the training job with SGD-SaI and AdamW; median tokens/s per step over
    steps 2..N of every run (step 1 compiles nothing here but fixes g-SNR)."""
    results: dict[str, list[float]] = {"sgdsai": [], "adamw": []}
    before = load()
    with tempfile.TemporaryDirectory() as runs:
        for r in range(repeats):
            for opt in ("sgdsai", "adamw"):
                name = f"{opt}-{r}"
                cmd = [
                    sys.executable, "-m", "sai_dist.train", "--backend", "fsdp2", "--nproc", "2",
                    "--device", "cpu", "--optimizer", opt, "--steps", str(steps),
                    "--eval-every", str(10 * steps), "--ckpt-every", str(10 * steps),
                    "--runs-dir", runs, "--name", name, "--no-progress",
                ]  # fmt: skip
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                with open(os.path.join(runs, name, "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f]
                tps = [row["tokens_per_s"] for row in rows if row.get("kind") == "train" and row["step"] > 1]
                results[opt].append(statistics.median(tps))
    after = load()
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "job": f"python -m sai_dist.train --backend fsdp2 --nproc 2 --device cpu --steps {steps}",
        "runs_each": repeats,
        "tokens_per_s": med,
        "tokens_per_s_runs": results,
        "sgdsai_vs_adamw": med["sgdsai"] / med["adamw"],
        "loadavg_before": before,
        "loadavg_after": after,
    }


# -- report ------------------------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    env = result["env"]
    print(
        f"{env['device_name']}, torch {env['torch']}, {env['threads']} threads, fused kernel: {env['fused']}"
    )
    for set_name, part in result.get("step", {}).items():
        print(
            f"\n[{set_name}] {part['tensors']} tensors, {part['elements'] / 1e6:.1f} M fp32 elements; "
            f"triad {part['triad_GBps']:.1f} GB/s, copy {part['copy_GBps']:.1f} GB/s; "
            f"load {part['loadavg_before']} -> {part['loadavg_after']}"
        )
        print(f"{'':<20} {'ms':>9} {'GB/s':>7} {'x triad':>8} {'x copy':>7}")
        for name, row in part["rows"].items():
            extra = (
                f"{row['GBps']:>7.1f} {row['x_triad_bw']:>8.2f} {row['x_copy_bw']:>7.2f}"
                if "GBps" in row
                else ""
            )
            print(f"{name:<20} {row['ms']:>9.2f} {extra}")
        for k, v in part["ratios"].items():
            print(f"  {k:<30} {v:.3f}")
        for k, v in part["skipped"].items():
            print(f"  skipped {k}: {v}")
    if "collectives" in result:
        c = result["collectives"]
        print(f"\n[collectives] {c['backend']}, {c['world']} ranks, {c['tensors']} parameter tensors:")
        for i, counts in enumerate(c["per_step"], 1):
            print(f"  step {i}: {counts or 'none'}")
    if "e2e" in result:
        e = result["e2e"]
        print(
            f"\n[end to end] {e['job']}, {e['runs_each']} runs each, "
            f"load {e['loadavg_before']} -> {e['loadavg_after']}"
        )
        for k, v in e["tokens_per_s"].items():
            print(f"  {k:<8} {v:,.0f} tokens/s")
        print(f"  sgdsai / adamw: {e['sgdsai_vs_adamw']:.3f}")


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(result.get("step", {}))
    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(5 * (len(sets) + 1), 4))
    for ax, set_name in zip(axes, sets, strict=False):
        part = result["step"][set_name]
        names = [
            k
            for k in ("triad", "torch_sgd_fused", "sgdsai", "torch_adamw_fused", "sgdsai_foreach")
            if k in part["rows"]
        ]
        ref = part["rows"]["torch_sgd_fused"]["ms"] if "torch_sgd_fused" in part["rows"] else 1.0
        vals = [part["rows"][k]["ms"] / ref for k in names]
        bars = ax.bar(range(len(names)), vals, color=["grey", "C0", "C2", "C1", "C3"][: len(names)])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_xticks(
            range(len(names)), [k.replace("torch_", "").replace("_", "\n") for k in names], fontsize=8
        )
        ax.axhline(1.15, color="C2", ls="--", lw=0.8)
        ax.set_ylabel("time / torch SGD(fused) step")
        ax.set_title(f"{set_name}: {part['elements'] / 1e6:.0f} M elements, load {part['loadavg_after'][0]}")
    ax = axes[-1]
    part = result["step"][sets[0]]
    if "sgdsai_first" in part["rows"]:
        rows = part["rows"]
        steady = rows["sgdsai"]["ms"]
        labels = ["steady step", "g-SNR stats", "first step"]
        vals = [1.0, rows["gsnr_statistics"]["ms"] / steady, rows["sgdsai_first"]["ms"] / steady]
        if "torch_sgd_fused_first" in rows:
            labels.append("torch SGD(fused)\nfirst / its steady")
            vals.append(rows["torch_sgd_fused_first"]["ms"] / rows["torch_sgd_fused"]["ms"])
        bars = ax.bar(range(len(vals)), vals, color=["C2", "C4", "C5", "C0"][: len(vals)])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_xticks(range(len(vals)), labels, fontsize=8)
        ax.axhline(2.5, color="C5", ls="--", lw=0.8)
        ax.set_ylabel("time / steady step")
        ax.set_title(f"{sets[0]}: step 1 vs steady")
    fig.suptitle(
        f"{result['env']['device_name']}, torch {result['env']['torch']}, {result['env']['threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--set", action="append", choices=sorted(SHAPE_SETS), help="shape set(s); repeatable")
    parser.add_argument(
        "--parts",
        default="step,first,collectives",
        help="comma list of step,first,collectives,lowp",
    )
    parser.add_argument("--lowp-layers", type=int, default=12, help="GPT-2 small layers of the lowp part")
    parser.add_argument(
        "--lowp-builds",
        default=None,
        help="comma list of SAI_DIST_LOWP_SIMD builds (avx512,avx2,0) the lowp part times side by side",
    )
    parser.add_argument("--e2e", action="store_true", help="also time the training job (a few minutes)")
    parser.add_argument("--e2e-steps", type=int, default=30)
    parser.add_argument("--e2e-runs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--threads",
        default=None,
        help="comma list of torch.set_num_threads values for the step and lowp parts (default: torch's)",
    )
    parser.add_argument("--write", help="write the JSON result here")
    parser.add_argument("--plot", help="save a plot here (PNG)")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "--device cuda: no CUDA device on this machine"}))
        return
    sets = args.set or (["1b"] if device.type == "cuda" else ["gpt2-small"])
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {
        "env": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "threads": thread_counts,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpus": os.cpu_count(),
            "fused": "available"
            if functional.fused_available(device)
            else functional.fused_unavailable_reason(device),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu_model": cpu_model(),
        }
    }
    if "lowp" in parts:
        builds = args.lowp_builds.split(",") if args.lowp_builds else None
        # one run per --threads count (the kernel splits its blocks over torch's threads)
        result["lowp"] = []
        for threads in thread_counts if device.type == "cpu" else thread_counts[:1]:
            torch.set_num_threads(threads)
            result["lowp"].append(lowp_part(args.lowp_layers, args.repeats, builds, device))
            print(json.dumps(result["lowp"][-1], indent=1))
        torch.set_num_threads(thread_counts[0])
    if "step" in parts:
        result["step"] = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for set_name in sets:
                key = (
                    set_name
                    if len(thread_counts) == 1
                    else f"{set_name}, {threads} thread{'s' * (threads > 1)}"
                )
                shapes = SHAPE_SETS[set_name]
                need = 8 * numel(shapes) + 8 * numel(shapes)  # params + grads, one optimizer's state
                if need > available_bytes(device) - 2 * GiB:
                    result["step"][key] = {"skipped": f"needs at least {need / GiB:.1f} GiB"}
                    print(f"[{key}] skipped: needs at least {need / GiB:.1f} GiB", file=sys.stderr)
                    continue
                params = make_params(shapes, device)
                result["step"][key] = step_part(params, device, args.repeats, "first" in parts)
                result["step"][key]["threads"] = threads
                del params
                gc.collect()
        torch.set_num_threads(thread_counts[0])
        result["step"] = {k: v for k, v in result["step"].items() if "skipped" not in v} | {
            k: v for k, v in result["step"].items() if "skipped" in v
        }
    if "collectives" in parts and device.type == "cpu":
        result["collectives"] = collectives_part()
    if args.e2e:
        result["e2e"] = e2e_part(args.e2e_runs, args.e2e_steps)
    print_report({**result, "step": {k: v for k, v in result.get("step", {}).items() if "rows" in v}})
    if args.write:
        os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
        with open(args.write, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot and result.get("step"):
        plot({**result, "step": {k: v for k, v in result["step"].items() if "rows" in v}}, args.plot)


if __name__ == "__main__":
    main()
