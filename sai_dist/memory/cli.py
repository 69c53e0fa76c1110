"""``sai-dist memory``: optimizer-state accounting, a per-device planner and Table 1.

sai-dist memory --model llama2-7b                 # human table, fp32, one device
sai-dist memory --model llama2-7b --json          # for scripts
sai-dist memory --model llama2-13b --world-size 8 --precision bf16-mixed --device-mem 80GiB
sai-dist memory --paper                           # Table 1 of the paper beside ours
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

from sai_dist.memory import in_backward
from sai_dist.memory.accounting import OPTIMIZERS, PRECISIONS, STRATEGIES, rank_memory, sgd_sai_scalar_bytes
from sai_dist.memory.models import PRESETS, ModelSpec, ViTConfig, resolve_model
from sai_dist.memory.parallel import parallel_memory
from sai_dist.memory.plan import (
    GIB,
    PAPER_TABLE1,
    cuda_block_bytes,
    estimate_activations,
    largest_unit,
    parallel_verdicts,
    plan,
)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_NAMES = {"sgd_sai": "SGD-SaI", "sgd_momentum": "SGD-mom", "adamw": "AdamW"}


def parse_bytes(text: str) -> int:
    """``"80GiB"`` -> bytes; decimal units (GB) are powers of 1000, binary (GiB) of 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 80GiB, 40GB, 1.5TiB, 123456)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="llama2-7b",
        help=f"preset ({', '.join(sorted(PRESETS))}), a Hugging Face-style config.json, "
        "or a factory 'package.module:function' (called on the meta device)",
    )
    parser.add_argument("--world-size", type=int, default=1, help="ranks (default 1)")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="HSDP shard-group size (default: the largest divisor of the world size up to 8)",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument(
        "--momentum-dtype",
        choices=("float32", "bfloat16", "int8"),
        default=None,
        help="SGD-SaI momentum storage (default: the parameters' dtype); int8 = 1 B + 4 B per 2048",
    )
    parser.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: pure bf16 parameters and gradients stepped with stochastic rounding, no master",
    )
    parser.add_argument(
        "--offload", action="store_true", help="optimizer state (and master weights) on the host"
    )
    parser.add_argument(
        "--strategies",
        default=None,
        help=f"comma-separated subset of {','.join(STRATEGIES)} (default all; fsdp2 under --tp/--pp)",
    )
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel degree (Megatron/torchtitan plan; FSDP2 on world/(tp*pp) data-parallel ranks)",
    )
    parser.add_argument(
        "--pp",
        type=int,
        default=1,
        help="pipeline-parallel degree: contiguous block stages, the busiest stage reported",
    )
    parser.add_argument(
        "--device-mem",
        type=parse_bytes,
        default=None,
        help="per-device budget (e.g. 80GiB): say which strategies fit",
    )
    parser.add_argument(
        "--activation-mem",
        type=parse_bytes,
        default=None,
        help="activation bytes per rank; estimated from the architecture when omitted",
    )
    parser.add_argument("--batch", type=int, default=1, help="micro-batch for the activation estimate")
    parser.add_argument("--seq", type=int, default=1024, help="context length for the activation estimate")
    parser.add_argument("--paper", action="store_true", help="print Table 1 of the paper beside our figures")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    in_backward.add_arguments(parser)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _strategies(text: str | None) -> tuple[str, ...]:
    if text is None:
        return STRATEGIES
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise ValueError(
            f"--strategies: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(STRATEGIES)}"
        )
    return names


_PARALLEL = ("fsdp2",)


def _parallel_strategies(text: str | None) -> tuple[str, ...]:
    """Under --tp/--pp only FSDP2 on the data-parallel ranks composes (torchtitan's layout)."""
    names = _strategies(text) if text is not None else _PARALLEL
    bad = [s for s in names if s != "fsdp2"]
    if bad:
        raise ValueError(
            f"--strategies {','.join(bad)} with --tp/--pp: tensor and pipeline parallel are accounted "
            "with FSDP2 on the world/(tp*pp) data-parallel ranks only (DeepSpeed ZeRO and DDP do not "
            "compose with DTensor tensor parallel here, HSDP is not modelled); use --strategies fsdp2"
        )
    return _PARALLEL


def paper_rows() -> list[dict]:
    """Table 1 beside our exact single-device fp32 figures."""
    rows = []
    for name, paper in PAPER_TABLE1.items():
        spec = resolve_model(name)
        mem = rank_memory([s for _, s in spec.params], "single")
        ours = {o: mem.state[o] for o in ("sgd_sai", "adamw")}
        # The same tensors as CUDA caching-allocator blocks (what a GPU profile records).
        blocks = sum(cuda_block_bytes(4 * math.prod(s)) for _, s in spec.params)
        rows.append(
            dict(
                model=name,
                parameters=spec.numel,
                ours_bytes=ours,
                ours_gib={o: v / GIB for o, v in ours.items()},
                cuda_blocks_gib={o: OPTIMIZERS[o] * blocks / GIB for o in ("sgd_sai", "adamw")},
                paper_gib=paper,
                savings_bytes=ours["adamw"] - ours["sgd_sai"],
                paper_savings_gib=paper["adamw"] - paper["sgd_sai"],
                headline_savings_gib=paper["sgd_sai"],  # the abstract quotes the SGD-SaI column as savings
            )
        )
    return rows


def report(spec: ModelSpec, args: argparse.Namespace) -> dict:
    shapes = [s for _, s in spec.params]
    world = max(1, args.world_size)
    # HSDP default: the largest shard group of at most 8 ranks (one node) dividing the world.
    shard = args.shard_size or max(d for d in range(1, min(8, world) + 1) if world % d == 0)
    tp, pp = getattr(args, "tp", 1), getattr(args, "pp", 1)
    parallel = None
    if tp != 1 or pp != 1:
        if getattr(args, "in_backward", False):
            raise ValueError("--in-backward models one process, not --tp/--pp (it is single-process only)")
        strategies = _parallel_strategies(args.strategies)
    else:
        strategies = _strategies(args.strategies)
    unit = largest_unit(spec.module)
    low = dict(
        momentum_dtype=getattr(args, "momentum_dtype", None),
        param_dtype=getattr(args, "param_dtype", "float32"),
    )
    single = rank_memory(shapes, "single", 1, args.precision, **low)
    out: dict = dict(
        model=spec.name,
        parameters=spec.numel,
        param_tensors=len(shapes),
        precision=args.precision,
        world_size=world,
        offload=args.offload,
        optimizers={o: dict(buffers=OPTIMIZERS[o], state_bytes=single.state[o]) for o in OPTIMIZERS},
        sgd_sai_cpu_scalar_bytes=sgd_sai_scalar_bytes(len(shapes)),
        savings_bytes=dict(
            adamw_minus_sgd_sai=single.state["adamw"] - single.state["sgd_sai"],
            sgd_momentum_minus_sgd_sai=single.state["sgd_momentum"] - single.state["sgd_sai"],
        ),
    )
    out["savings_gib"] = {k: v / GIB for k, v in out["savings_bytes"].items()}
    if low["momentum_dtype"] is not None or low["param_dtype"] != "float32":
        out["sgd_sai_state"] = low
    if strategies == _PARALLEL:
        parallel = parallel_memory(spec, world, tp, pp, args.precision, args.offload, **low)
        out["parallel"] = parallel.as_dict()
        # The busiest stage's rank, in the same shape as every other strategy's entry.
        out["strategies"] = {"fsdp2": parallel.busiest.memory.as_dict()}
    else:
        out["strategies"] = {
            s: rank_memory(
                shapes, s, world, args.precision, args.offload, shard_size=shard, largest_unit=unit, **low
            ).as_dict()
            for s in strategies
        }
    if args.device_mem is not None:
        act = args.activation_mem
        source = "given"
        if act is None:
            act = estimate_activations(spec, args.batch, args.seq, args.precision, tp=tp)
            c = spec.config
            tokens = (
                f"{(c.image_size // c.patch_size) ** 2 + 1} tokens per image"
                if isinstance(c, ViTConfig)
                else f"context {args.seq}"
            )
            source = f"estimated (batch {args.batch}, {tokens}, no recomputation"
            source += f", tp {tp} without sequence parallel)" if tp > 1 else ")"
            if act is None:
                raise ValueError(f"cannot estimate activations of {spec.name!r}: pass --activation-mem")
        verdicts = (
            parallel_verdicts(parallel, args.device_mem, act)
            if parallel is not None
            else plan(
                spec,
                args.device_mem,
                act,
                world_size=world,
                precision=args.precision,
                offload=args.offload,
                shard_size=shard,
                strategies=strategies,
                **low,
            )
        )
        out["planner"] = dict(
            device_mem=args.device_mem,
            activation_bytes=act,
            activation_source=source,
            verdicts=[
                dict(strategy=v.strategy, optimizer=v.optimizer, total=v.total, margin=v.margin, fits=v.fits)
                for _, vs in verdicts
                for v in vs
            ],
        )
    if args.paper:
        out["paper_table1"] = paper_rows()
    if args.in_backward:
        out["in_backward"] = in_backward.report(spec, args, parse_bytes)
    return out


def format_human(r: dict) -> str:
    lines = [
        f"{r['model']}: {r['parameters']:,} parameters in {r['param_tensors']} tensors, {r['precision']}, "
        f"world size {r['world_size']}{', optimizer offload' if r['offload'] else ''}",
        "optimizer state on one device: "
        + ", ".join(
            f"{_NAMES[o]} {_gib(v['state_bytes'])} GiB ({v['buffers']} buffer{'s' * (v['buffers'] > 1)})"
            for o, v in r["optimizers"].items()
        ),
        f"AdamW - SGD-SaI: {r['savings_bytes']['adamw_minus_sgd_sai']:,} bytes = "
        f"{r['savings_gib']['adamw_minus_sgd_sai']:.2f} GiB saved "
        f"(SGD-SaI also keeps {r['sgd_sai_cpu_scalar_bytes']:,} bytes of CPU scalars)",
        "",
        "per rank (rank 0, the largest), GiB",
    ]
    head = f"{'strategy':10s}{'params':>9s}{'grads':>9s}{'master':>9s}{'buffers':>9s}{'transient':>10s}"
    head += "".join(f"{_NAMES[o]:>10s}" for o in OPTIMIZERS)
    offload = r["offload"]
    if offload:
        head += f"{'host SaI':>10s}{'host Adam':>10s}"
    lines.append(head)
    for name, m in r["strategies"].items():
        label = name if name != "hsdp" else f"hsdp/{m['shard_size']}"
        row = f"{label:10s}" + "".join(f"{_gib(m[k]):>9s}" for k in ("params", "grads", "master", "buffers"))
        row += f"{_gib(m['transient']):>10s}" + "".join(f"{_gib(m['state'][o]):>10s}" for o in OPTIMIZERS)
        if offload:
            row += f"{_gib(m['host']['sgd_sai']):>10s}{_gib(m['host']['adamw']):>10s}"
        lines.append(row)
    if "parallel" in r:
        lines += ["", *format_parallel(r["parallel"])]
    if "planner" in r:
        p = r["planner"]
        lines += [
            "",
            f"planner: {p['device_mem'] / GIB:.2f} GiB per device, activations "
            f"{p['activation_bytes'] / GIB:.2f} GiB ({p['activation_source']})",
            f"{'strategy':10s}{'SGD-SaI':>22s}{'AdamW':>22s}",
        ]
        by = {}
        for v in p["verdicts"]:
            by.setdefault(v["strategy"], {})[v["optimizer"]] = v
        for s, vs in by.items():
            cells = []
            for o in ("sgd_sai", "adamw"):
                v = vs[o]
                word = "fits" if v["fits"] else "OOM"
                cells.append(f"{word} {v['margin'] / GIB:+8.2f} GiB")
            lines.append(f"{s:10s}" + "".join(f"{c:>22s}" for c in cells))
    if "paper_table1" in r:
        lines += ["", format_paper(r["paper_table1"])]
    if "in_backward" in r:
        lines.append(in_backward.format_human(r["in_backward"]))
    return "\n".join(lines)


def format_parallel(par: dict) -> list[str]:
    """The per-stage table of ``--tp/--pp`` (dp rank 0 of each stage; ``*`` the busiest)."""
    dp = par["dp"]
    how = f"FSDP2 over dp {dp}" if dp > 1 else "dp 1, no data-parallel sharding"
    lines = [
        f"tp {par['tp']} x pp {par['pp']} x dp {dp} ({how}): per rank of each stage (dp rank 0), GiB",
        f"{'stage':7s}{'blocks':>9s}{'params':>9s}{'grads':>9s}{'master':>9s}{'transient':>10s}"
        + "".join(f"{_NAMES[o]:>10s}" for o in OPTIMIZERS)
        + f"{'total SaI':>10s}{'total Adam':>11s}",
    ]
    for st in par["stages"]:
        m, b = st["memory"], st["blocks"]
        blocks = f"{b[0]}-{b[-1]}" if b else "-"
        mark = "*" if st["stage"] == par["busiest_stage"] else " "
        fixed = m["params"] + m["grads"] + m["master"] + m["buffers"] + m["transient"]
        lines.append(
            f"{st['stage']:<6d}{mark}{blocks:>9s}"
            + "".join(f"{_gib(m[k]):>9s}" for k in ("params", "grads", "master"))
            + f"{_gib(m['transient']):>10s}"
            + "".join(f"{_gib(m['state'][o]):>10s}" for o in OPTIMIZERS)
            + f"{_gib(fixed + m['state']['sgd_sai']):>10s}{_gib(fixed + m['state']['adamw']):>11s}"
        )
    lines.append("* busiest stage (the most bytes with SGD-SaI): its rank is the 'fsdp2' row above")
    return lines


def format_paper(rows: list[dict]) -> str:
    lines = [
        "Table 1 (arXiv 2412.11768): optimizer state, GiB, fp32, one device",
        "  exact: bytes of the state tensors; blocks: the same tensors as CUDA caching-allocator blocks",
        f"{'model':11s}{'params':>15s} | {'SGD-SaI exact':>13s}{'blocks':>8s}{'paper':>7s} | "
        f"{'AdamW exact':>11s}{'blocks':>8s}{'paper':>7s} | {'saved':>6s}{'abstract':>9s}",
    ]
    for x in rows:
        o, b, p = x["ours_gib"], x["cuda_blocks_gib"], x["paper_gib"]
        lines.append(
            f"{x['model']:11s}{x['parameters']:>15,d} | {o['sgd_sai']:>13.2f}{b['sgd_sai']:>8.2f}"
            f"{p['sgd_sai']:>7.2f} | {o['adamw']:>11.2f}{b['adamw']:>8.2f}{p['adamw']:>7.2f} | "
            f"{x['savings_bytes'] / GIB:>6.2f}{x['headline_savings_gib']:>9.2f}"
        )
    lines.append("differences explained in docs/memory.md (Table 1 reproduction)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        spec = resolve_model(args.model)
        result = report(spec, args)
    except ValueError as exc:
        print(f"sai-dist memory: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_human(result))
    return 0
