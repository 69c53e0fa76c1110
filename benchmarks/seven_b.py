r"""Llama2-7B, full-parameter, trained under a hard memory cap where every AdamW fails.

What one run does (each optimizer in a fresh subprocess, the cap set inside it):

* **Model.** The preset (``llama2-7b``: 6,738,415,616 parameters) is built on the meta
  device, cast to bf16 there, and only then materialised (``to_empty``): no fp32 copy of
  the model ever exists. Matrices are drawn from N(0, 0.02) in bf16, norms set to 1.
* **Compute.** Activation checkpointing per decoder layer (and for the head + loss). On
  CPU each checkpointed region computes in fp32 from the bf16 storage: the region's
  weights are cast when it runs (``p.to(float32)``, inside the region, so the fp32 copy is
  recomputed in backward instead of saved) and autograd casts their gradients back to bf16
  (this CPU has no bf16 matrix unit: a bf16 matmul runs ~250x slower than fp32 here). On a
  GPU everything computes in bf16. Batch 1, a short context, the **same batch every
  step**, so the loss falls if updates land.
* **Optimizer.** SGD-SaI in-backward (:class:`sai_dist.in_backward.InBackwardSGDSaI`,
  ``first_step="two_pass"``) with int8 momentum: peak = bf16 parameters + int8 momentum +
  one block's gradient + activations at every step, step 1 included.
* **Competitors**, each under the same cap, in-backward too (torch's optimizer-in-backward
  recipe: one optimizer per parameter stepped in a post-accumulate-grad hook, so no
  competitor is charged for a gradient copy): torch AdamW with fp32 state (torch's own
  ``adam(decoupled_weight_decay=True)`` kernel on an fp32 view of the one block being
  stepped) and with bf16 state (``torch.optim.AdamW`` on the bf16 parameter), an 8-bit
  AdamW (torchao ``AdamW8bit``, else bitsandbytes ``AdamW8bit``), SGD-SaI with fp32 and
  bf16 momentum. Each is expected to fail with an out-of-memory error, recorded with the
  memory it reached.
* **Cap.** CPU: ``RLIMIT_DATA`` (default; private writable memory: heap and anonymous
  mappings, i.e. every tensor) or ``RLIMIT_AS``, set absolute, for the whole process,
  before torch is imported; glibc's mmap threshold is pinned so freed tensors leave at once.
  An allocation past the cap fails inside the process (``RuntimeError: ... can't allocate
  memory``) long before the kernel's OOM killer would act, provided the machine has the
  cap free: the parent refuses to start otherwise. GPU: ``--device cuda --cap 24GiB``
  uses ``torch.cuda.set_per_process_memory_fraction`` (the 24 GB consumer-card case).
* **Measured.** ``VmHWM`` (peak resident set of the whole process) per phase: build,
  step 1 pass 1 (moments only), step 1 pass 2 (first update), each later step; the
  high-water mark is reset between phases (``/proc/self/clear_refs``). On CUDA also
  ``torch.cuda.max_memory_allocated``/``reserved`` per phase. Step times, losses.

::

    PYTHONPATH=. python benchmarks/seven_b.py                         # the CPU run, ~1 h
    PYTHONPATH=. python benchmarks/seven_b.py --device cuda --cap 24GiB
    PYTHONPATH=. python benchmarks/seven_b.py --preset tiny --cap 2GiB --momentum-dtype float32 \
        --steps 3 --out /tmp/seven_b_tiny.json                         # a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from process_memory import pin_mmap_threshold, reset_hwm, status_kib

GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]

#: The run that must train, then the competitors that must not fit.
RUNS: dict[str, dict[str, str]] = {
    "sgd_sai_int8": dict(kind="sgd_sai", momentum_dtype="int8"),
    "adamw_fp32": dict(kind="adamw", state="float32"),
    "adamw_bf16": dict(kind="adamw", state="bfloat16"),
    "adamw_8bit": dict(kind="adamw8bit"),
    "sgd_sai_fp32": dict(kind="sgd_sai", momentum_dtype="float32"),
    "sgd_sai_bf16": dict(kind="sgd_sai", momentum_dtype="bfloat16"),
}
MAIN_RUN = "sgd_sai_int8"

#: Small Llama-shaped presets for smoke tests (the real ones are sai_dist.memory.PRESETS).
TINY = dict(n_layer=2, n_head=4, n_kv_head=4, dim=128, intermediate=352, vocab_size=1000)
SMALL = dict(n_layer=4, n_head=8, n_kv_head=8, dim=512, intermediate=1376, vocab_size=8000)
#: 168M parameters, Llama 2 vocabulary: big enough that the transient terms of the
#: accounting (head cast, update temporaries) are measurable, small enough for CI.
MEDIUM = dict(n_layer=8, n_head=16, n_kv_head=16, dim=1024, intermediate=2816, vocab_size=32000)

_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}


def parse_size(text: str) -> int:
    """``"22GiB"`` -> bytes (binary units are powers of 1024, decimal of 1000)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 22GiB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _config(preset: str):
    from sai_dist.memory.models import PRESETS, LlamaConfig

    if preset == "tiny":
        return LlamaConfig(**TINY)
    if preset == "small":
        return LlamaConfig(**SMALL)
    if preset == "medium":
        return LlamaConfig(**MEDIUM)
    config = PRESETS.get(preset)
    if not isinstance(config, LlamaConfig):
        llamas = sorted(k for k, v in PRESETS.items() if isinstance(v, LlamaConfig))
        raise SystemExit(
            f"seven_b: --preset {preset!r} is not a Llama preset; use tiny, small, medium or {llamas}"
        )
    return config


# -- the child: one run, one process ----------------------------------------------------


class _Meter:
    """Peak memory per phase: VmHWM of the whole process (and CUDA peaks on a GPU)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.phases: list[dict] = []
        self.t0 = time.perf_counter()

    def start(self) -> None:
        reset_hwm()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def end(self, name: str, **extra) -> dict:
        row = dict(
            phase=name,
            vm_hwm_bytes=status_kib("VmHWM") * 1024,
            seconds=round(time.perf_counter() - self.t0, 2),
        )
        if self.cuda:
            import torch

            row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            row["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row.update(extra)
        self.phases.append(row)
        self.start()
        return row


def _build_model(config, device):
    """The model in bf16 from the meta device: never an fp32 copy."""
    import torch

    from sai_dist.memory.models import LlamaDecoder

    with torch.device("meta"):
        model = LlamaDecoder(config)
    model.to(dtype=torch.bfloat16)  # on meta: changes the dtype, allocates nothing
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    return model


def _loss_fn(model, compute_dtype):
    """``(x, y) -> loss``: checkpointed per decoder layer, each region computing in
    ``compute_dtype`` from the bf16 storage (the cast inside the region, so it is
    recomputed in backward and never saved)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call
    from torch.utils.checkpoint import checkpoint

    def cast(module):
        return {n: p.to(compute_dtype) for n, p in module.named_parameters()}

    def layer_region(layer, h):
        return functional_call(layer, cast(layer), (h,))

    def head_region(h, y):
        h = functional_call(model.norm, cast(model.norm), (h,))
        logits = F.linear(h, model.output.weight.to(compute_dtype))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def loss(x, y):
        # The lookup reads bf16 rows; the table's gradient is built in bf16 directly.
        h = model.tok_embeddings(x).to(compute_dtype)
        for layer in model.layers:
            h = checkpoint(layer_region, layer, h, use_reentrant=False)
        return checkpoint(head_region, h, y, use_reentrant=False)

    del torch
    return loss


class _PerParam:
    """torch's optimizer-in-backward recipe: ``step(p)`` in each parameter's
    post-accumulate-grad hook, then the gradient is dropped."""

    def __init__(self, params, step) -> None:
        self.handles = []
        for p in params:

            def hook(p, step=step):
                step(p)
                p.grad = None

            self.handles.append(p.register_post_accumulate_grad_hook(hook))


def _adamw_fp32(params, lr: float) -> _PerParam:
    """torch's AdamW kernel with fp32 state for bf16 parameters: each step runs on an fp32
    view of the one block being stepped and writes it back."""
    import torch
    from torch.optim.adam import adam

    state: dict[int, list] = {}

    @torch.no_grad()
    def step(p):
        if id(p) not in state:
            state[id(p)] = [
                torch.zeros_like(p, dtype=torch.float32),
                torch.zeros_like(p, dtype=torch.float32),
            ]
            state[id(p)].append(torch.tensor(0.0))
        m, v, t = state[id(p)]
        p32, g32 = p.float(), p.grad.float()
        adam(
            [p32],
            [g32],
            [m],
            [v],
            [],
            [t],
            foreach=False,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=lr,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )
        p.copy_(p32)

    return _PerParam(params, step)


def _adamw_torch(params, lr: float, factory) -> _PerParam:
    opts = {id(p): factory([p], lr) for p in params}

    def step(p):
        opts[id(p)].step()

    return _PerParam(params, step)


def _eight_bit_factory():
    """``(factory, name)`` of a maintained 8-bit AdamW that imports here, or ``(None, why)``."""
    reasons = []
    try:
        from torchao.optim import AdamW8bit

        return (lambda ps, lr: AdamW8bit(ps, lr=lr, weight_decay=0.0)), "torchao.optim.AdamW8bit"
    except Exception as e:  # ImportError, or a torchao built for another torch
        reasons.append(f"torchao: {type(e).__name__}: {str(e)[:120]}")
    try:
        import bitsandbytes as bnb

        return (
            lambda ps, lr: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=0.0)
        ), "bitsandbytes.optim.AdamW8bit"
    except Exception as e:
        reasons.append(f"bitsandbytes: {type(e).__name__}: {str(e)[:120]}")
    return None, "; ".join(reasons)


def _supports_momentum_dtype() -> bool:
    from sai_dist import SGDSaI

    return "momentum_dtype" in inspect.signature(SGDSaI.__init__).parameters


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def child(args: argparse.Namespace) -> dict:
    """One run in this process: cap, build, train, report (the cap first of all)."""
    cuda = args.device == "cuda"
    result: dict = dict(run=args.run, device=args.device, cap_bytes=args.cap, steps_done=0, losses=[])
    if not cuda and args.cap:
        limit = resource.RLIMIT_DATA if args.cap_kind == "data" else resource.RLIMIT_AS
        resource.setrlimit(limit, (args.cap, args.cap))
        result["cap_kind"] = "RLIMIT_DATA" if args.cap_kind == "data" else "RLIMIT_AS"
    pin_mmap_threshold()
    import torch

    from sai_dist.in_backward import InBackwardSGDSaI

    meter = _Meter(cuda)
    result["phases"] = meter.phases
    spec = RUNS[args.run]
    device = torch.device(args.device)
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        if args.cap:
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap / total))
            result["cap_kind"] = "torch.cuda.set_per_process_memory_fraction"
        result["gpu"] = torch.cuda.get_device_name(0)
    else:
        torch.set_num_threads(args.threads)
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    result["compute_dtype"] = str(compute_dtype).replace("torch.", "")
    result["baseline_rss_bytes"] = status_kib("VmRSS") * 1024
    config = _config(args.preset)
    t_start = time.perf_counter()
    meter.start()
    phase = "build"
    try:
        model = _build_model(config, device)
        params = list(model.parameters())
        result["parameters"] = sum(p.numel() for p in params)
        runner = None
        if spec["kind"] == "sgd_sai":
            kw: dict = dict(lr=args.lr, momentum=0.9, weight_decay=0.0, first_step="two_pass")
            if _supports_momentum_dtype():
                kw["momentum_dtype"] = spec["momentum_dtype"]
                result["momentum_dtype"] = spec["momentum_dtype"]
            elif args.run != MAIN_RUN and spec["momentum_dtype"] == "float32":
                result["status"] = "skipped"
                result["error"] = (
                    "the installed SGDSaI has no momentum_dtype: fp32 momentum of bf16 parameters needs it"
                )
                return result
            else:
                result["momentum_dtype"] = "bfloat16 (the parameters' dtype: momentum_dtype unsupported here)"
                print(
                    f"seven_b: the installed SGDSaI does not accept momentum_dtype; run {args.run} runs "
                    "without it, so its momentum has the parameters' dtype (bf16) instead of "
                    f"{spec['momentum_dtype']} (low-precision state, issue 16, not merged)",
                    file=sys.stderr,
                )
            runner = InBackwardSGDSaI(params, **kw)
        elif spec["kind"] == "adamw" and spec["state"] == "float32":
            _adamw_fp32(params, args.adam_lr)
        elif spec["kind"] == "adamw":
            _adamw_torch(
                params,
                args.adam_lr,
                lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, foreach=False),
            )
        else:
            factory, name = _eight_bit_factory()
            if factory is None:
                result["status"] = "unavailable"
                result["error"] = name
                return result
            result["optimizer_impl"] = name
            _adamw_torch(params, args.adam_lr, factory)
        g = torch.Generator().manual_seed(1234)
        x = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=g).to(device)
        y = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=g).to(device)
        loss_of = _loss_fn(model, compute_dtype)
        meter.end("build")
        if cuda:
            torch.cuda.synchronize()

        for step in range(1, args.steps + 1):
            passes: list[float] = []

            def closure(step=step, passes=passes):
                nonlocal phase
                two_pass = runner is not None and step == 1
                phase = f"step {step}" + (f" pass {len(passes) + 1}" if two_pass else "")
                loss = loss_of(x, y)
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                value = float(loss)
                passes.append(value)
                meter.end(phase, loss=round(value, 5))
                return loss

            t = time.perf_counter()
            loss = runner.step(closure) if runner is not None else closure()
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite loss {value} at step {step}")
            result["losses"].append(round(value, 5))
            result.setdefault("step_seconds", []).append(round(time.perf_counter() - t, 2))
            result["steps_done"] = step
            print(
                f"[{args.run}] step {step} loss {value:.5f} ({time.perf_counter() - t:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        result["status"] = "trained"
        losses = result["losses"]
        result["loss_fell"] = len(losses) > 1 and losses[-1] < losses[0]
    except BaseException as exc:
        if not _is_oom(exc):
            raise
        row = meter.end(phase + " (failed)", vm_data_bytes=status_kib("VmData") * 1024)
        result["status"] = "out of memory"
        result["failed_in"] = phase
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:240]}"
        result["memory_reached_bytes"] = row["vm_hwm_bytes"] if not cuda else row["cuda_max_allocated_bytes"]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["peak_vm_hwm_bytes"] = max((r["vm_hwm_bytes"] for r in meter.phases), default=0)
    if cuda:
        result["peak_cuda_allocated_bytes"] = max(
            (r["cuda_max_allocated_bytes"] for r in meter.phases), default=0
        )
    return result


# -- the parent ------------------------------------------------------------------------


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _predictions(args: argparse.Namespace) -> dict | None:
    try:
        from sai_dist.memory.in_backward import seven_b_predictions
    except ImportError:
        return None
    return seven_b_predictions(_config(args.preset), args.batch, args.context, device=args.device)


def run_child(args: argparse.Namespace, run: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", run, "--preset", args.preset]
    cmd += ["--device", args.device, "--cap", str(args.cap), "--cap-kind", args.cap_kind]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--context", str(args.context)]
    cmd += ["--threads", str(args.threads), "--lr", str(args.lr), "--adam-lr", str(args.adam_lr)]
    cmd += ["--momentum-dtype", RUNS[MAIN_RUN]["momentum_dtype"]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(run=run, status="timed out", error=f"no result after {args.timeout} s")
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        # Killed (the kernel's OOM killer, an abort in an allocator) or crashed: say so.
        return dict(
            run=run,
            status=f"died (exit {out.returncode})",
            error=out.stderr.strip()[-600:],
            seconds=round(time.perf_counter() - t, 1),
        )
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset",
        default="llama2-7b",
        help="llama2-7b (default), another Llama preset, medium, small or tiny",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--cap", type=parse_size, default=parse_size("22GiB"), help="hard cap (default 22GiB)")
    ap.add_argument(
        "--cap-kind", choices=("data", "as"), default="data", help="CPU: RLIMIT_DATA or RLIMIT_AS"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-2, help="SGD-SaI learning rate")
    ap.add_argument("--adam-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument(
        "--momentum-dtype",
        default=None,
        help="momentum dtype of the main run (default int8); float32 for a smoke test",
    )
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument(
        "--force", action="store_true", help="start even if the machine has less than the cap free"
    )
    ap.add_argument("--out", default=None, help="JSON results (default docs/data/seven_b_<device>.json)")
    ap.add_argument("--child", choices=tuple(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 64 <= args.context <= 128 and args.preset == "llama2-7b":
        print(f"seven_b: note: context {args.context} is outside the issue's 64-128 tokens", file=sys.stderr)
    if args.momentum_dtype:
        RUNS[MAIN_RUN]["momentum_dtype"] = args.momentum_dtype
    if args.child:
        args.run = args.child
        print(json.dumps(child(args)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                "seven_b: --device cuda: no CUDA device on this machine (torch.cuda.is_available() is "
                "False); nothing was run. Run it on a GPU machine, or drop --device for the CPU run.",
                file=sys.stderr,
            )
            return 2
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        print(f"seven_b: --runs: unknown {bad or '(empty)'}; choose from {', '.join(RUNS)}", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.force and _mem_available() < args.cap + GIB // 2:
        print(
            f"seven_b: only {_mem_available() / GIB:.1f} GiB available, less than the cap "
            f"{args.cap / GIB:.1f} GiB + 0.5 GiB: the kernel's OOM killer could act before the cap. "
            "Free memory, lower --cap, or --force.",
            file=sys.stderr,
        )
        return 2
    config = _config(args.preset)
    report: dict = dict(
        preset=args.preset,
        config=repr(config),
        device=args.device,
        cap_bytes=args.cap,
        cap_gib=round(args.cap / GIB, 3),
        batch=args.batch,
        context=args.context,
        steps=args.steps,
        threads=args.threads,
        main_momentum_dtype=RUNS[MAIN_RUN]["momentum_dtype"],
        predicted=_predictions(args),
        runs=[],
    )
    print(f"seven_b: {args.preset} {config}, cap {args.cap / GIB:.2f} GiB on {args.device}", flush=True)
    out = Path(args.out) if args.out else ROOT / "docs" / "data" / f"seven_b_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for run in runs:
        r = run_child(args, run)
        report["runs"].append(r)
        out.write_text(json.dumps(report, indent=1) + "\n")  # after every run: a killed suite keeps them
        peak = r.get("peak_vm_hwm_bytes") if args.device == "cpu" else r.get("peak_cuda_allocated_bytes")
        peak_s = f"{peak / GIB:7.2f} GiB" if peak else "    n/a"
        print(
            f"{run:14s} {r['status']:14s} steps {r.get('steps_done', 0)}  peak {peak_s}  "
            f"losses {r.get('losses', [])}  {r.get('error', '')[:160]}",
            flush=True,
        )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
