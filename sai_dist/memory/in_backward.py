r"""Predicted peak of optimizer-in-backward training with checkpointed, cast-per-region compute.

The setting of ``benchmarks/seven_b.py``: parameters stored in ``param_dtype``, every
optimizer stepped inside backward (one block's gradient alive at a time; for SGD-SaI the
two-pass first step, so step 1 is no exception), activation checkpointing per decoder
layer, and on CPU each checkpointed *region* (a decoder layer; the head) computing in fp32
from the 16-bit storage. The peak of the whole process is

.. math::
    \text{peak} = R + |\theta|_{\text{param}} + S_{\text{opt}}
        + \max_{\text{regions } r} T_r + A

* :math:`R`: the interpreter, torch and sai_dist resident before the model (``runtime``;
  measured 0.256 GiB on this CPU machine after importing torch and sai_dist; default 0.26 GiB).
* :math:`S_{\text{opt}}`: the optimizer state, exactly, tensor by tensor (table below).
* :math:`T_r`: what exists only while region :math:`r` is back-propagated: its weights cast
  to the compute dtype (none when compute and storage dtypes agree, as on a GPU), and for
  its largest tensor the gradient in the storage dtype plus the larger of its gradient in
  the compute dtype (freed once cast) and the update's temporaries (three fp32 copies of
  the block where state or parameter is not fp32: gradient, decoded state, parameter;
  none for SGD-SaI on CPU, whose single-pass kernel updates in place).
  Each parameter outside every region is a region of its own (the head, computed from a
  cast; the embedding table, looked up in its storage dtype).
* :math:`A`: activations with checkpointing: the layer inputs kept at region boundaries,
  one layer's internals being recomputed (34 sbh elements, Korthikanti et al. 2022), and
  the logits with their softmax gradient in fp32.

===================  ===========================================================
optimizer            state bytes per parameter tensor of n elements
===================  ===========================================================
``sgd_sai_int8``     n + 4 ceil(n / 2048) (int8 codes, one fp32 scale per 2048
                     elements); fp32 (4n) for n < 4096 (``sai_dist.momentum``)
``sgd_sai_bf16``     2n
``sgd_sai_fp32``     4n
``adamw_bf16``       2 x 2n (``exp_avg``, ``exp_avg_sq`` in the parameter's dtype)
``adamw_fp32``       2 x 4n
``adamw_8bit``       2 x (n + 4 ceil(n / 256)) for n >= 4096 (torchao ``AdamW8bit``:
                     block 256, fp32 scales; smaller tensors keep 16-bit state, 2 x 2n)
===================  ===========================================================

This is a model, not a measurement: ``benchmarks/seven_b.py`` records the measured peak
beside this prediction (``docs/memory.md``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from sai_dist.memory.models import LlamaConfig, ModelSpec, NanoGPTConfig

__all__ = ["IN_BACKWARD_OPTIMIZERS", "InBackwardPeak", "in_backward_peak", "seven_b_predictions"]

GIB = 1 << 30
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
#: Elements per int8 momentum block and the size below which int8 momentum stays fp32
#: (the values of ``sai_dist.momentum.BLOCK`` / ``SMALL``).
INT8_BLOCK, INT8_SMALL = 2048, 4096
#: torchao AdamW8bit: block size, and the size below which it keeps plain state.
AO8_BLOCK, AO8_SMALL = 256, 4096
RUNTIME_BYTES = int(0.26 * GIB)

IN_BACKWARD_OPTIMIZERS = (
    "sgd_sai_int8",
    "sgd_sai_bf16",
    "sgd_sai_fp32",
    "adamw_fp32",
    "adamw_bf16",
    "adamw_8bit",
)


def state_bytes(optimizer: str, n: int, param_bytes: int) -> int:
    """Optimizer-state bytes of one parameter tensor of ``n`` elements (module table)."""
    if optimizer == "sgd_sai_int8":
        return 4 * n if n < INT8_SMALL else n + 4 * math.ceil(n / INT8_BLOCK)
    if optimizer == "sgd_sai_bf16":
        return 2 * n
    if optimizer == "sgd_sai_fp32":
        return 4 * n
    if optimizer == "adamw_fp32":
        return 8 * n
    if optimizer == "adamw_bf16":
        return 2 * param_bytes * n
    if optimizer == "adamw_8bit":
        return 2 * param_bytes * n if n < AO8_SMALL else 2 * (n + 4 * math.ceil(n / AO8_BLOCK))
    raise ValueError(
        f"unknown in-backward optimizer {optimizer!r} (choose from {', '.join(IN_BACKWARD_OPTIMIZERS)})"
    )


def _update_temporaries(optimizer: str, n: int, param_bytes: int, single_pass: bool) -> int:
    """Temporaries of one block's update (module docstring): three fp32 copies of the
    block (gradient, decoded state, parameter) wherever state or parameter is not fp32,
    as in the reference low-precision update of ``sai_dist.functional`` and in the fp32
    AdamW here; torch's AdamW in the parameter's dtype keeps one (its denominator).
    ``single_pass``: SGD-SaI's update runs in the single-pass CPU kernel
    (:mod:`sai_dist.native_lowp`, every parameter x momentum dtype), which reads and
    writes each element in place and allocates nothing of the block's size."""
    if optimizer.startswith("sgd_sai") and single_pass:
        return 0
    if optimizer == "adamw_bf16":
        return param_bytes * n
    if optimizer == "sgd_sai_fp32" and param_bytes == 4:
        return 0
    return 3 * 4 * n


def _single_pass_kernel() -> bool:
    """Whether :mod:`sai_dist.native_lowp` builds on this machine (compiled once, cached)."""
    from sai_dist import native_lowp

    return native_lowp.library() is not None


def _regions(module: nn.Module) -> list[tuple[list[int], bool]]:
    """``(element counts, computed from a cast)`` of each checkpointed region: every child
    of the biggest ``nn.ModuleList``, then every other parameter on its own (tied ones
    once). An embedding table is looked up in its storage dtype (not cast)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    seen: set[int] = set()
    regions: list[tuple[list[int], bool]] = []
    if lists:
        for child in max(lists, key=len):
            sizes = []
            for p in child.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    sizes.append(p.numel())
            regions.append((sizes, True))
    looked_up = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            regions.append(([p.numel()], id(p) not in looked_up))
    return regions


@dataclass
class InBackwardPeak:
    """Predicted bytes of one in-backward run (whole process)."""

    optimizer: str
    runtime: int
    params: int
    state: int
    transient: int
    activations: int

    @property
    def total(self) -> int:
        return self.runtime + self.params + self.state + self.transient + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "total_gib": self.total / GIB}


def _activations(spec: ModelSpec, batch: int, seq: int, compute_bytes: int) -> int:
    c = spec.config
    if isinstance(c, LlamaConfig):
        layers, h, vocab = c.n_layer, c.dim, c.vocab_size
    elif isinstance(c, NanoGPTConfig):
        layers, h, vocab = c.n_layer, c.n_embd, c.vocab_size
    else:
        raise ValueError(f"in-backward prediction: no activation model for {type(c).__name__}")
    tokens = batch * seq
    boundaries = layers * tokens * h * compute_bytes
    one_layer = 34 * tokens * h * compute_bytes // 2
    logits = 3 * tokens * vocab * 4
    return boundaries + one_layer + logits


def in_backward_peak(
    spec: ModelSpec,
    optimizer: str,
    *,
    param_dtype: str = "bf16",
    compute_dtype: str = "fp32",
    batch: int = 1,
    seq: int = 128,
    runtime: int = RUNTIME_BYTES,
    single_pass: bool | None = None,
) -> InBackwardPeak:
    """Predicted peak of ``optimizer`` stepped in backward (module docstring).

    ``single_pass``: whether SGD-SaI's update runs in the single-pass CPU kernel; default:
    on CPU (``compute_dtype`` fp32, this module's CPU setting) where that kernel builds
    here (a C compiler is present), otherwise the reference update with its temporaries
    (the GPU setting computes in bf16)."""
    if single_pass is None:
        single_pass = compute_dtype == "fp32" and _single_pass_kernel()
    if param_dtype not in DTYPE_BYTES or compute_dtype not in DTYPE_BYTES:
        raise ValueError(
            f"in-backward prediction: unknown dtype (param {param_dtype!r}, compute {compute_dtype!r}); "
            f"choose from {', '.join(sorted(DTYPE_BYTES))}"
        )
    pb, cb = DTYPE_BYTES[param_dtype], DTYPE_BYTES[compute_dtype]
    sizes = [math.prod(s) for _, s in spec.params]
    params = pb * sum(sizes)
    state = sum(state_bytes(optimizer, n, pb) for n in sizes)
    transient = 0
    for region, cast_region in _regions(spec.module):
        largest = max(region, default=0)
        cast = cast_region and cb != pb
        weights = cb * sum(region) if cast else 0  # the region's weights in the compute dtype
        # Then its largest tensor: the gradient in the compute dtype is cast to the storage
        # dtype and freed before the hook runs the update with its temporaries.
        before_hook = cb * largest if cast else 0
        after = max(before_hook, _update_temporaries(optimizer, largest, pb, single_pass))
        transient = max(transient, weights + pb * largest + after)
    acts = _activations(spec, batch, seq, cb)
    return InBackwardPeak(optimizer, runtime, params, state, transient, acts)


def seven_b_predictions(config, batch: int, seq: int, device: str = "cpu") -> dict:
    """Predictions for every run of ``benchmarks/seven_b.py`` on ``config``."""
    import torch

    from sai_dist.memory.models import LlamaDecoder, param_shapes

    with torch.device("meta"):
        module = LlamaDecoder(config)
    spec = ModelSpec("seven_b", module, config, param_shapes(module))
    compute = "fp32" if device == "cpu" else "bf16"
    runtime = RUNTIME_BYTES if device == "cpu" else 0
    return {
        o: in_backward_peak(
            spec, o, param_dtype="bf16", compute_dtype=compute, batch=batch, seq=seq, runtime=runtime
        ).as_dict()
        for o in IN_BACKWARD_OPTIMIZERS
    }


# -- ``sai-dist memory --in-backward`` ------------------------------------------------------


def add_arguments(parser) -> None:
    """The options of ``sai-dist memory --in-backward`` (each only if not defined already)."""
    have = parser._option_string_actions
    if "--in-backward" not in have:
        parser.add_argument(
            "--in-backward",
            action="store_true",
            help="predict optimizer-in-backward training (two-pass first step, checkpointed layers) "
            "for SGD-SaI and the AdamW variants; with --device-mem, which fit",
        )
    if "--param-dtype" not in have:
        parser.add_argument(
            "--param-dtype",
            default="float32",
            help="parameter storage dtype: bfloat16 (bf16) or float32 (fp32)",
        )
    if "--momentum-dtype" not in have:
        parser.add_argument(
            "--momentum-dtype",
            default=None,
            help="SGD-SaI momentum: int8, bfloat16 or float32 (default: the params')",
        )
    if "--compute-dtype" not in have:
        parser.add_argument(
            "--compute-dtype",
            default=None,
            help="--in-backward: dtype layers compute in (default fp32: cast per layer, as on CPU; "
            "bf16 as on a GPU)",
        )
    if "--runtime-mem" not in have:
        parser.add_argument(
            "--runtime-mem",
            default=None,
            help="--in-backward: interpreter + torch resident bytes (default 0.26GiB, measured on CPU)",
        )


_SHORT = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "int8": "int8"}


def report(spec: ModelSpec, args, parse_bytes) -> dict:
    """The ``in_backward`` section of ``sai-dist memory``: predictions for every optimizer,
    the one ``--momentum-dtype`` names first, and verdicts against ``--device-mem``."""
    param = _SHORT.get(str(args.param_dtype or "float32"))
    mom = _SHORT.get(str(args.momentum_dtype)) if args.momentum_dtype else param  # default: the params
    compute = _SHORT.get(str(args.compute_dtype or "fp32"))
    for flag, value, allowed in (
        ("--param-dtype", param, ("bf16", "fp32")),
        ("--momentum-dtype", mom, ("int8", "bf16", "fp32")),
        ("--compute-dtype", compute, ("bf16", "fp32")),
    ):
        if value not in allowed:
            raise ValueError(f"{flag}: must be one of {', '.join(allowed)}")
    runtime = parse_bytes(args.runtime_mem) if args.runtime_mem else RUNTIME_BYTES
    chosen = f"sgd_sai_{mom}"
    order = [chosen] + [o for o in IN_BACKWARD_OPTIMIZERS if o != chosen]
    peaks = {
        o: in_backward_peak(
            spec, o, param_dtype=param, compute_dtype=compute, batch=args.batch, seq=args.seq, runtime=runtime
        ).as_dict()
        for o in order
    }
    out: dict = dict(
        param_dtype=param,
        compute_dtype=compute,
        batch=args.batch,
        context=args.seq,
        sgd_sai=chosen,
        peaks=peaks,
    )
    if args.device_mem is not None:
        out["device_mem"] = args.device_mem
        out["verdicts"] = {
            o: dict(fits=p["total"] <= args.device_mem, margin=args.device_mem - p["total"])
            for o, p in peaks.items()
        }
    return out


def format_human(r: dict) -> str:
    lines = [
        "",
        f"optimizer-in-backward ({r['param_dtype']} parameters, layers computing in {r['compute_dtype']}, "
        f"checkpointed, batch {r['batch']}, context {r['context']}), predicted peak, GiB",
        f"{'optimizer':14s}{'runtime':>9s}{'params':>9s}{'state':>9s}{'transient':>10s}{'acts':>7s}{'total':>9s}"
        + ("   verdict" if "verdicts" in r else ""),
    ]
    for o, p in r["peaks"].items():
        widths = (("runtime", 9), ("params", 9), ("state", 9), ("transient", 10))
        row = f"{o:14s}" + "".join(f"{p[k] / GIB:>{w}.2f}" for k, w in widths)
        row += f"{p['activations'] / GIB:>7.2f}{p['total'] / GIB:>9.2f}"
        if "verdicts" in r:
            v = r["verdicts"][o]
            row += f"   {'fits' if v['fits'] else 'OOM'} {v['margin'] / GIB:+.2f} GiB"
        lines.append(row)
    if "verdicts" in r:
        lines.append(f"budget {r['device_mem'] / GIB:.2f} GiB for the whole process")
    return "\n".join(lines)
