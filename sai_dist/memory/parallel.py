r"""Per-rank memory under tensor parallel x pipeline parallel x FSDP2 (the torchtitan layout).

The world of ``W`` ranks is the mesh ``("pp", "dp", "tp")`` with ``dp = W / (tp * pp)``.
For one rank at coordinate ``(s, d, t)`` the accounting follows what each layer does to a
parameter of global shape ``S``:

1. **Pipeline stage** (:func:`stage_blocks`). The model's block list (its largest
   ``nn.ModuleList`` / ``nn.ModuleDict``) is split into ``pp`` contiguous runs, as even as
   possible, earlier stages taking the extra block: stage ``s`` holds
   ``L // pp + (1 if s < L % pp else 0)`` blocks. Parameters registered before the first
   block (embeddings, positions, class token) live on the first stage, parameters after
   the last block (final norm, head) on the last. A tied head (the gpt2 presets'
   ``lm_head.weight is wte.weight``) is counted on the first stage as the embedding and,
   when ``pp > 1``, again on the last stage as the head: each stage's optimizer holds its
   own copy (Megatron's shared-embedding arrangement). With ``pp = 1`` it is one tensor.
2. **Tensor parallel** (:data:`DEFAULT_TP_PLAN`, Megatron / torchtitan). Column-parallel
   linears (attention q/k/v, a fused qkv, MLP up/gate/fc) are split over dim 0 (their
   output features), biases too: local shape ``(S_0 / tp, S_1)``. Row-parallel linears
   (attention out, MLP down/proj) are split over dim 1: ``(S_0, S_1 / tp)``, their bias
   replicated. Everything else (norms, embeddings, positions, the head) is replicated
   across ``tp``; torchtitan also shards embeddings over the vocabulary and the head over
   its output features (vocab-parallel), which is not modelled here. A split dimension
   not divisible by ``tp`` is refused naming the tensor (DTensor would shard it unevenly;
   neither the job nor these tests do).
3. **FSDP2 over dp** (when ``dp > 1``; with ``dp = 1`` nothing is wrapped, as the job and
   the 3-D tests do): the TP-local tensor is split along its dim 0 into chunks of
   ``c = ceil(S'_0 / dp)`` rows; rank ``d`` holds ``max(0, min(c, S'_0 - d c))`` rows
   (unpadded: the DTensor's local tensor and the optimizer state), FSDP2's parameter and
   gradient storage ``c`` rows (padded). This is :func:`~sai_dist.memory.accounting.rank_memory`'s
   ``fsdp2`` rule applied to the TP-local shapes; ``dp = 1`` is its ``single`` rule.

SGD-SaI's momentum (:mod:`sai_dist.momentum`) is stored per *local piece*: each DTensor
parameter's local tensor is one piece, so int8 codes take 1 B per local element plus one
float32 scale per block of 2048 elements *of the local piece* (a TP or FSDP2 shard of
``n`` elements has ``ceil(n / 2048)`` scales, not the whole tensor's count). The
small-tensor rule (fewer than 4096 elements keep float32) looks at the *original*
parameter's size, exactly as :meth:`sai_dist.SGDSaI` does (``p.numel()`` of a DTensor is
its global size), so a TP shard never changes which tensors are small.

Low-precision momentum needs each element's index in the original parameter, which
:class:`sai_dist.layouts.dtensor.DTensorLayout` gives only for a local piece that is one
contiguous run of it. A column-parallel tensor is one (``Shard(0)`` on ``tp``; FSDP2 over
it adds a ``_StridedShard(0)`` on ``dp``, which keeps the rank's rows contiguous and which
torch 2.13 does not derive from ``Shard``), a row-parallel weight is not (``Shard(1)``:
one run per row). The optimizer therefore refuses bf16/int8 momentum for a row-parallel
weight (int8 only from 4096 elements, below which it stays float32), and
:func:`check_low_precision` refuses the same tensors with the optimizer's reason, instead of
predicting bytes no run can hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from torch import nn

from sai_dist.memory.accounting import RankMemory, _dim0_shard, buffer_elements, rank_memory
from sai_dist.memory.models import ModelSpec
from sai_dist.stages import data_parallel_degree, stage_blocks

__all__ = [
    "DEFAULT_TP_PLAN",
    "TP_STYLES",
    "ParallelMemory",
    "StageMemory",
    "check_degrees",
    "check_low_precision",
    "local_params",
    "parallel_memory",
    "stage_blocks",
    "stage_params",
    "tp_style",
]

Shape = tuple[int, ...]
TP_STYLES = ("colwise", "rowwise", "replicate")

#: Leaf module name (or a fused-projection parameter's stem) -> tensor-parallel style.
#: nanoGPT (gpt2 presets; the fused ``c_attn`` is split over its rows [q; k; v]), Llama 2,
#: ViT (``nn.MultiheadAttention``'s fused ``in_proj``), and the short names of the 3-D tests.
DEFAULT_TP_PLAN: dict[str, str] = {
    **dict.fromkeys(("c_attn", "c_fc", "wq", "wk", "wv", "w1", "w3", "in_proj", "fc1"), "colwise"),
    **dict.fromkeys(("q", "k", "v", "qkv", "up", "gate"), "colwise"),
    **dict.fromkeys(("attn_proj", "mlp_proj", "wo", "w2", "out_proj", "fc2", "o", "down"), "rowwise"),
}

#: SGD-SaI's int8 / bf16 momentum settings (``sai_dist.momentum``).
_INT8_SMALL = 4096


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def check_degrees(world_size: int, tp: int, pp: int) -> int:
    """The data-parallel degree ``world_size / (tp * pp)``; ``ValueError`` naming the flag
    when a degree is not a positive integer or ``tp * pp`` does not divide the world."""
    return data_parallel_degree(
        world_size, tp, pp, world="--world-size", fix="use a multiple of {n} ranks or lower --tp/--pp"
    )


def _block_container(module: nn.Module) -> tuple[str, list[str]] | None:
    """``(prefix, child names)`` of the model's block list: its largest ``ModuleList`` /
    ``ModuleDict`` (the transformer's layers), ``None`` if it has none."""
    best: tuple[str, list[str]] | None = None
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList | nn.ModuleDict):
            keys = [k for k, _ in m.named_children()]
            if best is None or len(keys) > len(best[1]):
                best = (name, keys)
    return best


def stage_params(module: nn.Module, pp: int) -> list[list[tuple[str, Shape]]]:
    """``(name, shape)`` of the trainable parameters each of ``pp`` stages holds (see the
    module docstring: blocks by :func:`stage_blocks`, parameters before the blocks on the
    first stage, after them on the last, a tied tensor once per stage that uses it)."""
    named = [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad]
    if pp == 1:
        seen: set[int] = set()
        once = []
        for n, p in named:
            if id(p) not in seen:
                seen.add(id(p))
                once.append((n, tuple(p.shape)))
        return [once]
    container = _block_container(module)
    if container is None:
        raise ValueError(
            "--pp: the model has no block list (nn.ModuleList / nn.ModuleDict of layers) to split into stages"
        )
    prefix, keys = container
    ranges = stage_blocks(len(keys), pp)
    stage_of_block = {k: s for s, r in enumerate(ranges) for i, k in enumerate(keys) if i in r}
    head = f"{prefix}." if prefix else ""
    out: list[list[tuple[str, Shape]]] = [[] for _ in range(pp)]
    seen_in: list[set[int]] = [set() for _ in range(pp)]
    after_blocks = False
    for n, p in named:
        stage: int
        if n.startswith(head) and n[len(head) :].split(".", 1)[0] in stage_of_block:
            stage = stage_of_block[n[len(head) :].split(".", 1)[0]]
            after_blocks = True
        else:
            stage = pp - 1 if after_blocks else 0
        if id(p) not in seen_in[stage]:
            seen_in[stage].add(id(p))
            out[stage].append((n, tuple(p.shape)))
    return out


def tp_style(name: str, plan: Mapping[str, str] = DEFAULT_TP_PLAN) -> tuple[str, str]:
    """``(style, kind)`` of parameter ``name`` under ``plan``: style ``colwise``, ``rowwise``
    or ``replicate`` of its layer, kind ``weight`` or ``bias``. The layer is the leaf module
    (``h.0.c_attn`` of ``h.0.c_attn.weight``) or a fused stem (``in_proj`` of
    ``attn.in_proj_weight``)."""
    module, _, leaf = name.rpartition(".")
    if leaf in ("weight", "bias"):
        key, kind = module.rpartition(".")[2], leaf
    elif leaf.endswith("_weight") or leaf.endswith("_bias"):
        key, _, kind = leaf.rpartition("_")
    else:
        return "replicate", "weight"
    style = plan.get(key, "replicate")
    if style not in TP_STYLES:
        raise ValueError(f"tensor-parallel plan: {key!r} -> {style!r} is not one of {', '.join(TP_STYLES)}")
    return style, kind


@dataclass(frozen=True)
class LocalParam:
    """One parameter as a rank of a stage holds it."""

    name: str
    shape: Shape  #: global (original) shape
    tp_shape: Shape  #: after the tensor-parallel split
    style: str  #: colwise / rowwise / replicate, as applied (``replicate`` when tp == 1)
    shard_dims: tuple[int, ...]  #: dims split: by TP, then FSDP2's dim 0 (a _StridedShard over TP dim 0)


def local_params(
    params: Sequence[tuple[str, Shape]], tp: int, dp: int, plan: Mapping[str, str] = DEFAULT_TP_PLAN
) -> list[LocalParam]:
    """Each parameter's TP-local shape and Shard placements (module docstring, rule 2)."""
    out = []
    for name, shape in params:
        style, kind = tp_style(name, plan) if tp > 1 else ("replicate", "weight")
        tp_shape, dims = shape, []
        if style == "colwise":
            if not shape or shape[0] % tp:
                raise ValueError(
                    f"--tp {tp}: {name} {tuple(shape)} is column-parallel (split over dim 0) and its "
                    f"{shape[0] if shape else 0} rows are not divisible by {tp}; choose --tp dividing it"
                )
            tp_shape, dims = (shape[0] // tp, *shape[1:]), [0]
        elif style == "rowwise" and kind == "weight":
            if len(shape) < 2 or shape[1] % tp:
                raise ValueError(
                    f"--tp {tp}: {name} {tuple(shape)} is row-parallel (split over dim 1) and its "
                    f"{shape[1] if len(shape) > 1 else 0} columns are not divisible by {tp}; "
                    "choose --tp dividing it"
                )
            tp_shape, dims = (shape[0], shape[1] // tp, *shape[2:]), [1]
        elif style == "rowwise":
            style = "replicate"  # a row-parallel bias is replicated
        if dp > 1:
            dims.append(0)  # FSDP2's dim-0 shard of the local tensor
        out.append(LocalParam(name, tuple(shape), tuple(tp_shape), style, tuple(dims)))
    return out


def check_low_precision(params: Sequence[LocalParam], momentum_dtype: str | None) -> None:
    """Refuse, as :class:`sai_dist.SGDSaI` does at step 1, bf16/int8 momentum for a tensor
    whose local piece is not one contiguous run of the original (module docstring)."""
    if momentum_dtype not in ("bfloat16", "int8"):
        return
    for p in params:
        low = momentum_dtype == "bfloat16" or _numel(p.shape) >= _INT8_SMALL
        # Only a split of dim 1 (row-parallel) scatters the local piece; FSDP2's dim-0 shard
        # of it or of a column-parallel piece keeps each row run contiguous.
        if low and 1 in p.shard_dims:
            raise ValueError(
                f"--momentum-dtype {momentum_dtype}: {p.name} {p.shape} is row-parallel (Shard(1)), and "
                "SGDSaI refuses low-precision momentum there (its quantization blocks and random draws "
                "are keyed on each element's index in the original parameter, which a dim-1 shard "
                "cannot give). Use --momentum-dtype float32 with --tp > 1."
            )


def _sgd_sai_state(
    params: Sequence[LocalParam], dp: int, rank: int, momentum_dtype: str | None, param_dtype: str
) -> int:
    """Exact bytes of SGD-SaI's momentum (+ int8 scales) on dp rank ``rank``: per
    parameter its local piece, the small-tensor rule on the original size."""
    import torch

    from sai_dist import momentum as lowp

    dtype = torch.bfloat16 if param_dtype == "bfloat16" else torch.float32
    total = 0
    for p in params:
        local = _dim0_shard(p.tp_shape, dp, rank)[0]
        total += lowp.state_bytes(momentum_dtype, _numel(p.shape), [local] if local else [], dtype)
    return total


@dataclass
class StageMemory:
    """One rank of one stage: ``memory`` as :func:`rank_memory` reports it (``params`` and
    ``grads`` are FSDP2's padded storage), ``local_elements`` the unpadded elements of its
    local tensors (what ``to_local()`` holds, and the optimizer state's size)."""

    stage: int
    dp_rank: int
    blocks: list[int]
    param_tensors: int
    parameters: int
    local_elements: int
    padded_elements: int
    memory: RankMemory

    def as_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = self.memory.as_dict()
        return d


@dataclass
class ParallelMemory:
    """Every stage's rank (dp rank 0 unless asked) and the busiest one."""

    tp: int
    pp: int
    dp: int
    data_parallel: str  #: ``fsdp2`` (dp > 1) or ``none``
    stages: list[StageMemory]

    @property
    def busiest(self) -> StageMemory:
        """The stage whose rank holds the most bytes with SGD-SaI (ties: the earliest)."""
        return max(self.stages, key=lambda s: (s.memory.total("sgd_sai"), -s.stage))

    def total(self, optimizer: str, activations: int = 0) -> int:
        """The largest per-rank total over stages for ``optimizer``."""
        return max(s.memory.total(optimizer, activations) for s in self.stages)

    def as_dict(self) -> dict:
        return dict(
            tp=self.tp,
            pp=self.pp,
            dp=self.dp,
            data_parallel=self.data_parallel,
            busiest_stage=self.busiest.stage,
            stages=[s.as_dict() for s in self.stages],
        )


def _largest_block(container: tuple[str, list[str]] | None, stage: Sequence[LocalParam]) -> int:
    """TP-local elements of the stage's largest block (the unit FSDP2 gathers)."""
    if container is None:
        return sum(_numel(p.tp_shape) for p in stage)
    prefix, keys = container
    head = f"{prefix}." if prefix else ""
    per: dict[str, int] = {}
    for p in stage:
        if p.name.startswith(head):
            key = p.name[len(head) :].split(".", 1)[0]
            if key in keys:
                per[key] = per.get(key, 0) + _numel(p.tp_shape)
    return max(per.values(), default=0)


def parallel_memory(
    spec: ModelSpec,
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    precision: str = "fp32",
    offload: bool = False,
    *,
    momentum_dtype: str | None = None,
    param_dtype: str = "float32",
    dp_rank: int = 0,
    plan: Mapping[str, str] = DEFAULT_TP_PLAN,
) -> ParallelMemory:
    """Per-rank bytes of every pipeline stage at ``(tp, pp)`` over ``world_size`` ranks,
    FSDP2 on the remaining ``dp`` (module docstring); ``dp_rank`` picks the rank within
    the stage (0 holds the most). Raises ``ValueError`` naming the tensor or flag for a
    split that cannot be made or low-precision momentum the optimizer refuses."""
    dp = check_degrees(world_size, tp, pp)
    _check_heads(spec, tp)
    if not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank {dp_rank} is outside the data-parallel degree {dp}")
    strategy = "fsdp2" if dp > 1 else "single"
    container = _block_container(spec.module)
    stages = []
    for s, named in enumerate(stage_params(spec.module, pp)):
        local = local_params(named, tp, dp, plan)
        check_low_precision(local, momentum_dtype)
        shapes = [p.tp_shape for p in local]
        mem = rank_memory(
            shapes,
            strategy,
            dp,
            precision,
            offload,
            largest_unit=_largest_block(container, local) if dp > 1 else 0,
            momentum_dtype=momentum_dtype,
            param_dtype=param_dtype,
            rank=dp_rank,
        )
        if momentum_dtype is not None or param_dtype != "float32":
            # The small-tensor rule on the ORIGINAL size (rank_memory saw TP-local shapes).
            mem.state["sgd_sai"] = _sgd_sai_state(local, dp, dp_rank, momentum_dtype, param_dtype)
        local_elems, padded = buffer_elements(shapes, strategy, dp, rank=dp_rank)
        block_ids = sorted({b for p in local if (b := _block_index(container, p.name)) is not None})
        stages.append(
            StageMemory(
                stage=s,
                dp_rank=dp_rank,
                blocks=block_ids,
                param_tensors=len(local),
                parameters=sum(_numel(p.shape) for p in local),
                local_elements=local_elems,
                padded_elements=padded,
                memory=mem,
            )
        )
    return ParallelMemory(tp, pp, dp, "fsdp2" if dp > 1 else "none", stages)


def _check_heads(spec: ModelSpec, tp: int) -> None:
    """Column-parallel attention keeps whole heads on each TP rank: the preset's (query and
    key/value) head counts must be multiples of ``tp``."""
    c = spec.config
    heads = {
        "n_head": getattr(c, "n_head", None),
        "n_kv_head": getattr(c, "n_kv_head", None),
        "heads": getattr(c, "heads", None),
    }
    for field_name, n in heads.items():
        if isinstance(n, int) and n % tp:
            raise ValueError(
                f"--tp {tp}: {spec.name} has {n} attention heads ({field_name}), not divisible by {tp}; "
                "tensor parallel splits attention by whole heads, choose --tp dividing it"
            )


def _block_index(container: tuple[str, list[str]] | None, name: str) -> int | None:
    if container is None:
        return None
    prefix, keys = container
    head = f"{prefix}." if prefix else ""
    if not name.startswith(head):
        return None
    key = name[len(head) :].split(".", 1)[0]
    return keys.index(key) if key in keys else None
