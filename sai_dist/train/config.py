"""The training job's configuration: one dataclass, its command-line flags, and merging.

Flags default to "not given" so that ``--resume`` can start from the saved ``config.json``
and only the flags the user actually passes override it (e.g. ``--steps`` to extend a run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("single", "ddp", "fsdp2", "hsdp", "deepspeed")
QKV_FORMS = ("fused", "separate")  # mirrors sai_dist.train.model.QKV_FORMS (no torch import here)
OPTIMIZERS = ("sgdsai", "adamw", "sgd")

# Learning rates picked by the sweep in docs/benchmarks.md (best final validation loss at
# the default schedule); the job uses them when --lr is not given.
DEFAULT_LR = {"sgdsai": 1.0, "adamw": 3e-3, "sgd": 0.1}


@dataclass
class TrainConfig:
    """Everything that determines a run. Saved as ``config.json`` in the run folder."""

    # where
    name: str | None = None
    runs_dir: str = "runs"
    # how it is distributed
    backend: str = "fsdp2"
    nproc: int = 2
    device: str = "auto"
    hsdp_shard_size: int | None = None
    deepspeed_config: str | None = None
    pg_timeout: float = 600.0
    # tensor / pipeline parallel degrees (FSDP2 shards over the rest: dp = world / (tp * pp))
    tp: int = 1
    pp: int = 1
    # pipeline micro-batches per step; None = pp
    microbatches: int | None = None
    # model
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    seq_len: int = 128
    dropout: float = 0.0
    qkv: str = "fused"
    # data
    data_dir: str | None = None
    max_bytes: int = 4 << 20
    global_batch: int = 16
    seed: int = 0
    # optimisation
    optimizer: str = "sgdsai"
    lr: float | None = None
    momentum: float = 0.9
    # sgdsai's momentum storage (sai_dist.momentum): None = the parameters' dtype
    momentum_dtype: str | None = None
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    steps: int = 300
    # bookkeeping
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 100
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag of the first invalid setting.

        Called before any process group or run folder exists, so a bad command line costs
        nothing and leaves nothing behind.
        """
        _check_types(self)
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: choose auto, cpu or cuda")
        for name in (
            "nproc",
            "steps",
            "global_batch",
            "eval_every",
            "eval_batches",
            "ckpt_every",
            "n_layers",
            "d_model",
            "n_heads",
            "seq_len",
            "max_bytes",
            "tp",
            "pp",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"--microbatches must be >= 1, got {self.microbatches}")
        if not (math.isfinite(self.pg_timeout) and self.pg_timeout > 0):
            raise ValueError(f"--pg-timeout must be a finite number of seconds > 0, got {self.pg_timeout}")
        if self.hsdp_shard_size is not None and self.hsdp_shard_size < 1:
            raise ValueError(f"--hsdp-shard-size must be >= 1, got {self.hsdp_shard_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model {self.d_model} must be divisible by --n-heads {self.n_heads}")
        if self.qkv not in QKV_FORMS:
            raise ValueError(f"--qkv {self.qkv!r}: choose one of {', '.join(QKV_FORMS)}")
        self._validate_parallel()
        for name in ("warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        # NaN passes every ordered comparison, so finiteness is checked first.
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        _check_interval("momentum", self.momentum, 0.0, 1.0, "[0, 1)")
        if self.momentum_dtype not in (None, "float32", "bfloat16", "int8"):
            raise ValueError(
                f"--momentum-dtype must be float32, bfloat16 or int8, got {self.momentum_dtype!r}"
            )
        _check_interval("dropout", self.dropout, 0.0, 1.0, "[0, 1)")
        _check_interval("weight_decay", self.weight_decay, 0.0, math.inf, ">= 0")
        if not (math.isfinite(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(
                f"--grad-clip must be a finite number > 0 (or 0 to disable), got {self.grad_clip}"
            )
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {list(self.betas)}")
        for i, beta in enumerate(self.betas):
            _check_interval(f"betas[{i}]", beta, 0.0, 1.0, "[0, 1)")
        if self.backend == "deepspeed" and not self.deepspeed_config:
            raise ValueError("--backend deepspeed needs --deepspeed-config (e.g. configs/ds_zero2.json)")
        if self.deepspeed_config and not os.path.isfile(self.deepspeed_config):
            raise FileNotFoundError(f"--deepspeed-config {self.deepspeed_config!r}: no such file")

    @property
    def parallel3d(self) -> bool:
        """Whether this run uses tensor or pipeline parallelism (:mod:`sai_dist.train.parallel3d`)."""
        return self.tp > 1 or self.pp > 1

    @property
    def num_microbatches(self) -> int:
        return self.pp if self.microbatches is None else self.microbatches

    def _validate_parallel(self) -> None:
        """The world-independent conditions of ``--tp``/``--pp`` (the world-dependent ones are
        :func:`check_world`'s)."""
        if self.microbatches is not None and self.pp == 1:
            raise ValueError("--microbatches is for pipeline parallel: it needs --pp > 1")
        if not self.parallel3d:
            return
        if self.backend != "fsdp2":
            raise ValueError(
                f"--tp {self.tp} --pp {self.pp} with --backend {self.backend}: tensor and pipeline "
                "parallel run with FSDP2 on the remaining ranks only; use --backend fsdp2 (the default)"
            )
        if self.tp > 1 and self.qkv != "separate":
            raise ValueError(
                f"--tp {self.tp} needs --qkv separate: the fused qkv projection cannot be split "
                "column-wise by heads (the split would cut across q, k and v)"
            )
        from sai_dist.train.parallel3d import check_model

        check_model(self.tp, self.pp, self.n_heads, self.d_model, self.n_layers)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "config.json") -> TrainConfig:
        """The config ``data`` describes; ``source`` names it in errors. Unknown keys (a
        typo, a config from another version) are refused rather than ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
        data = dict(data)
        if isinstance(data.get("betas"), list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_interval(name: str, value: float, low: float, high: float, text: str) -> None:
    """``low <= value < high`` and finite, else a ``ValueError`` naming the flag."""
    label = _flag(name) if "[" not in name else f"--{name}"
    if not (math.isfinite(value) and low <= value < high):
        raise ValueError(f"{label} must be in {text}, got {value}")


_NUMBER = (int, float)


def _check_types(cfg: TrainConfig) -> None:
    """Field types, for configs read from JSON (argparse already converts flags): a
    string where a number belongs must fail here with the key's name, not deep inside
    a rank. Annotations are strings here (``from __future__ import annotations``)."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if value is None and kind.endswith("| None"):
            continue
        if kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, _NUMBER) and not isinstance(value, bool)
        elif kind.startswith("str"):
            ok = isinstance(value, str)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind.startswith("tuple"):
            ok = isinstance(value, tuple | list) and all(isinstance(b, _NUMBER) for b in value)
        else:
            ok = True
        if not ok:
            raise ValueError(f"{f.name} ({_flag(f.name)}): expected {kind}, got {value!r}")


def check_world(cfg: TrainConfig, world_size: int) -> None:
    """What the world size must divide: the global batch (every rank gets the same number
    of rows) and, for HSDP, be divisible by the shard-group size. Raises ``ValueError``
    naming the flags, before any model is built.

    Under ``--tp``/``--pp`` the world must be a multiple of ``tp * pp`` and the global batch
    is split over the data-parallel degree ``dp = world / (tp * pp)`` only (the ranks of one
    data-parallel coordinate see the same rows), then into ``--microbatches`` equal parts."""
    if cfg.parallel3d:
        from sai_dist.train.parallel3d import check_batch, check_degrees

        degrees = check_degrees(world_size, cfg.tp, cfg.pp, cfg.n_heads, cfg.n_layers, d_model=cfg.d_model)
        check_batch(cfg.global_batch, degrees.dp, cfg.num_microbatches)
        return
    if cfg.global_batch % world_size:
        raise ValueError(
            f"--global-batch {cfg.global_batch} is not divisible by the world size {world_size}: "
            "every rank takes the same number of rows"
        )
    if cfg.backend == "hsdp" and cfg.hsdp_shard_size is not None and world_size % cfg.hsdp_shard_size:
        raise ValueError(f"--hsdp-shard-size {cfg.hsdp_shard_size} must divide the world size {world_size}")


# flag -> (dataclass field, type, help). Booleans are handled separately.
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--name", "name", str, "run name: the folder runs/<name> (default: <backend>-<optimizer>-<time>)"),
    ("--runs-dir", "runs_dir", str, "parent folder of run folders (default: runs)"),
    ("--backend", "backend", str, f"one of {', '.join(BACKENDS)} (default: fsdp2)"),
    ("--nproc", "nproc", int, "local ranks to spawn when not started by a launcher (default: 2)"),
    ("--device", "device", str, "auto (CUDA if available), cpu or cuda"),
    (
        "--hsdp-shard-size",
        "hsdp_shard_size",
        int,
        "HSDP: ranks per shard group (default: ranks per node, or half the ranks on a single node)",
    ),
    ("--deepspeed-config", "deepspeed_config", str, "DeepSpeed JSON config (configs/ds_zero{1,2,3}.json)"),
    (
        "--pg-timeout",
        "pg_timeout",
        float,
        "seconds a rank waits in a collective (or for peers at start-up) before it fails naming "
        "it: the bound on detecting a dead or unreachable host (default: 600)",
    ),
    (
        "--tp",
        "tp",
        int,
        "tensor-parallel degree (needs --qkv separate; FSDP2 shards over world / (tp * pp)) (default: 1)",
    ),
    ("--pp", "pp", int, "pipeline-parallel stages (default: 1)"),
    ("--microbatches", "microbatches", int, "pipeline micro-batches per step (default: --pp)"),
    ("--n-layers", "n_layers", int, "transformer blocks (default: 4)"),
    ("--d-model", "d_model", int, "model width (default: 128)"),
    ("--n-heads", "n_heads", int, "attention heads (default: 4)"),
    ("--seq-len", "seq_len", int, "context length in bytes (default: 128)"),
    ("--dropout", "dropout", float, "dropout probability (default: 0)"),
    (
        "--qkv",
        "qkv",
        str,
        "attention projections: fused (one qkv Linear) or separate (q, k, v; needed by --tp) "
        "(default: fused)",
    ),
    ("--data-dir", "data_dir", str, "folder of *.py files to train on (default: the standard library)"),
    ("--max-bytes", "max_bytes", int, "corpus size cap in bytes (default: 4 MiB)"),
    ("--global-batch", "global_batch", int, "sequences per step over all ranks (default: 16)"),
    ("--seed", "seed", int, "seed of initialisation and data order (default: 0)"),
    ("--optimizer", "optimizer", str, f"one of {', '.join(OPTIMIZERS)} (default: sgdsai)"),
    (
        "--lr",
        "lr",
        float,
        "peak learning rate (default per optimizer: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
        + ")",
    ),
    ("--momentum", "momentum", float, "momentum of sgdsai and sgd (default: 0.9)"),
    (
        "--momentum-dtype",
        "momentum_dtype",
        str,
        "sgdsai momentum storage: float32, bfloat16 or int8 (default: the parameters' dtype)",
    ),
    ("--weight-decay", "weight_decay", float, "decoupled weight decay on matrices (default: 0.01)"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps before cosine decay (default: 20)"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final lr as a fraction of the peak (default: 0.1)"),
    ("--grad-clip", "grad_clip", float, "clip the global gradient norm; 0 disables (default: 1.0)"),
    ("--steps", "steps", int, "optimizer steps (default: 300)"),
    ("--eval-every", "eval_every", int, "validate every N steps (default: 50)"),
    ("--eval-batches", "eval_batches", int, "validation batches (default: 4)"),
    ("--ckpt-every", "ckpt_every", int, "checkpoint every N steps (default: 100; the last step always)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, dest, typ, help_text in _FLAGS:
        parser.add_argument(flag, dest=dest, type=typ, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no tqdm bar (log lines only)",
    )
    parser.add_argument(
        "--resume",
        default=None,
        help="continue from a run folder (its latest complete checkpoint) or a checkpoint folder; "
        "the saved config is reused and flags given here override it. 'auto' (with --name): continue "
        "runs/<name> if it has a checkpoint, else start it (the form for torchrun --max-restarts)",
    )
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment.
    parser.add_argument(
        "--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS
    )


def merge(base: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``base`` with every flag the user gave applied."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "grad_clip" in given and given["grad_clip"] is not None and given["grad_clip"] <= 0:
        given["grad_clip"] = None
    cfg = dataclasses.replace(base, **given)
    cfg.validate()
    return cfg


def load_json(path: str) -> TrainConfig:
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    cfg = TrainConfig.from_json(data, source=path)
    try:
        _check_types(cfg)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return cfg
