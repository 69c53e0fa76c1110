r"""Per-rank memory of training state: parameters, gradients, master weights, optimizer state.

Everything is counted from the real parameter shapes (:mod:`sai_dist.memory.models`), so
sharding padding is exact, not estimated. For a strategy at world size :math:`N` each rank
holds one *optimizer buffer* of :math:`E` fp32 elements per state slot; the optimizers
differ only in the number of slots:

===============  =====  ============================================
optimizer        slots  state
===============  =====  ============================================
``sgd_sai``      1      ``momentum_buffer`` (+ 3 CPU float32 scalars
                        per tensor: g-SNR, scale, max; reported apart)
``sgd_momentum`` 1      ``momentum_buffer`` (torch.optim.SGD)
``adamw``        2      ``exp_avg``, ``exp_avg_sq`` (+ a 0-d ``step``)
===============  =====  ============================================

:math:`E` per strategy, with :math:`n_p` the elements and :math:`d_{0,p}` the first
dimension of parameter :math:`p`, :math:`T=\sum_p n_p` (documented padding rules):

* ``single``, ``ddp``: :math:`E = T` (every rank a full replica).
* ``zero1``, ``zero2`` (DeepSpeed ``stage_1_and_2``): one flat buffer per param group,
  padded to a multiple of ``2 N`` elements (``nccl_start_alignment_factor = 2`` times the
  data-parallel size) and split evenly: :math:`E = \lceil T / 2N\rceil \cdot 2`.
  One param group is assumed; each extra group pads on its own (< 2N elements).
* ``zero3`` (DeepSpeed ``stage3``): every parameter is padded to a multiple of :math:`N`
  on its own and split evenly: :math:`E = \sum_p \lceil n_p / N\rceil`. Parameters
  below ``stage3_param_persistence_threshold`` (default 1e5 elements) are also kept
  whole on every rank (counted in ``params``; their state is partitioned all the same).
* ``fsdp2`` (``fully_shard``): every parameter is split along dim 0 into chunks of
  :math:`c_p = \lceil d_{0,p} / N\rceil` rows; rank :math:`r` holds rows
  :math:`[r c_p, \min((r+1) c_p, d_{0,p}))`. The optimizer's buffers are clones of the
  local (unpadded) shard, so rank :math:`r` holds
  :math:`E_r = \sum_p \max(0, \min(c_p, d_{0,p} - r c_p))\, n_p/d_{0,p}`; rank 0 always
  holds the most. Parameter and gradient storage is padded to :math:`c_p` rows on every
  rank (FSDP2 pads the sharded data for all-gather / reduce-scatter).
* ``hsdp``: FSDP2 sharding over a shard group of ``shard_size`` ranks, replicated across
  :math:`N / \text{shard\_size}` groups.

Precision recipes:

* ``fp32``: fp32 parameters and gradients; the optimizer steps them directly, no master
  copy, except DeepSpeed ZeRO-1/2, which always steps a separate fp32 clone of its
  partition (``single_partition_of_fp32_groups``), so :math:`4E` master bytes appear there.
  DeepSpeed 0.19.8 ZeRO-3 clones too: its in-place branch for fp32 partitions compares
  ``tensor.device`` with the device *name* string, which never compares equal, so the
  fp32 partition is always a copy (measured in ``tests/distributed/test_memory_measured.py``).
* ``bf16-mixed``: bf16 weights and gradients for compute, fp32 master weights and fp32
  optimizer state (Megatron / DeepSpeed bf16). FSDP2 with
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` keeps its *sharded*
  parameters in fp32, which are the master weights, and casts a unit to bf16 only while
  it is unsharded (counted as transient), with fp32 sharded gradients.

Optimizer offload (``offload=True``): the master weights and optimizer state live in host
memory (DeepSpeed ``offload_optimizer``; for ``single``/``ddp`` a CPU optimizer step);
for ``fsdp2``/``hsdp`` ``CPUOffloadPolicy`` moves sharded parameters, gradients and state
together.

Transient: ZeRO-1/2 build a flat fp32 gradient of the partition (:math:`4E`) at
``step()``; ZeRO-3 and FSDP2 hold the unsharded parameters of the unit being computed and
of the prefetched next one (2 x the largest unit, in the compute dtype).

Not counted: DDP's gradient buckets are counted as ``buffers`` (equal to the gradient size
with the default ``gradient_as_bucket_view=False``, zero with ``True``); DeepSpeed's
reduce/all-gather buckets and the CUDA caching allocator's rounding (blocks of 512 bytes,
unsplit cached blocks) are not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "STRATEGIES",
    "RankMemory",
    "buffer_elements",
    "rank_memory",
]

#: Optimizer -> number of fp32 buffers of the parameters' size it keeps.
OPTIMIZERS: dict[str, int] = {"sgd_sai": 1, "adamw": 2, "sgd_momentum": 1}
STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp2", "hsdp")
PRECISIONS = ("fp32", "bf16-mixed")
_ZERO12_ALIGN = 2  # DeepSpeed stage_1_and_2: nccl_start_alignment_factor
#: DeepSpeed's default ``stage3_param_persistence_threshold``: smaller parameters stay whole.
ZERO3_PERSISTENCE_THRESHOLD = 100_000

Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _dim0_shard(shape: Shape, n: int, rank: int) -> tuple[int, int]:
    """(local elements of ``rank``, padded elements) of an FSDP2 dim-0 shard."""
    numel = _numel(shape)
    if numel == 0:
        return 0, 0
    d0 = shape[0] if shape else 1
    row = numel // d0
    chunk = -(-d0 // n)
    local_rows = max(0, min(chunk, d0 - rank * chunk))
    return local_rows * row, chunk * row


def buffer_elements(
    shapes: Sequence[Shape], strategy: str, world_size: int, *, rank: int = 0, shard_size: int | None = None
) -> tuple[int, int]:
    """``(E, E_padded)``: elements of one optimizer buffer on ``rank``, and of the padded
    parameter/gradient storage for the same rank (equal except under FSDP2/HSDP); see the
    module docstring for the rules."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = sum(_numel(s) for s in shapes)
    if strategy in ("single", "ddp"):
        return total, total
    if strategy in ("zero1", "zero2"):
        align = _ZERO12_ALIGN * world_size
        e = -(-total // align) * align // world_size
        return e, e
    if strategy == "zero3":
        e = sum(-(-_numel(s) // world_size) for s in shapes)
        return e, e
    n = world_size
    if strategy == "hsdp":
        n = shard_size or world_size
        if world_size % n:
            raise ValueError(f"hsdp: world_size {world_size} is not a multiple of shard_size {n}")
    local = padded = 0
    for s in shapes:
        lo, pad = _dim0_shard(s, n, rank % n)
        local += lo
        padded += pad
    return local, padded


@dataclass
class RankMemory:
    """Bytes held by one rank (rank 0, the largest, unless asked) under a strategy."""

    strategy: str
    world_size: int
    precision: str
    offload: bool
    buffer_elements: int
    params: int
    grads: int
    master: int
    buffers: int
    transient: int
    state: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    shard_size: int | None = None

    def total(self, optimizer: str, activations: int = 0) -> int:
        """Device bytes of everything for ``optimizer`` plus ``activations``."""
        return (
            self.params
            + self.grads
            + self.master
            + self.buffers
            + self.transient
            + self.state[optimizer]
            + activations
        )

    def as_dict(self) -> dict:
        return asdict(self)


def rank_memory(
    shapes: Sequence[Shape],
    strategy: str,
    world_size: int = 1,
    precision: str = "fp32",
    offload: bool = False,
    *,
    shard_size: int | None = None,
    largest_unit: int = 0,
    momentum_dtype: str | None = None,
    param_dtype: str = "float32",
    rank: int = 0,
) -> RankMemory:
    """Per-rank memory of ``strategy`` on ``rank`` (default 0, which holds the most);
    ``largest_unit`` is the element count of the largest FSDP unit (a transformer block),
    for the transient unsharded parameters of FSDP2/ZeRO-3.

    ``momentum_dtype`` (SGD-SaI's storage, :mod:`sai_dist.momentum`) and ``param_dtype``
    (``"bfloat16"``: pure bf16 parameters and gradients stepped with stochastic rounding,
    no master copy) change the ``sgd_sai`` state and the parameter bytes; see
    :func:`sgd_sai_state_bytes`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    low_state = momentum_dtype is not None or param_dtype != "float32"
    if param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown param_dtype {param_dtype!r} (choose from float32, bfloat16)")
    zero = strategy.startswith("zero")
    if param_dtype != "float32" and (zero or offload):
        raise ValueError(
            f"param_dtype={param_dtype!r}: pure bf16 parameters without a master copy are modelled for "
            f"single, ddp, fsdp2 and hsdp without offload, not {strategy}"
            f"{' with offload' if offload else ''} (DeepSpeed always steps fp32 partitions: there "
            "only momentum_dtype applies)"
        )
    if low_state and offload and not zero:
        raise ValueError(
            f"momentum_dtype={momentum_dtype!r}: low-precision SGD-SaI state with offload is modelled for "
            f"DeepSpeed ZeRO (its offloaded fp32 partitions), not {strategy}"
        )
    if param_dtype == "bfloat16" and precision != "fp32":
        raise ValueError(
            "param_dtype='bfloat16' is pure bf16 training (no master weights): use precision fp32"
        )
    if strategy == "single":
        world_size = 1
    total = sum(_numel(s) for s in shapes)
    e, e_pad = buffer_elements(shapes, strategy, world_size, rank=rank, shard_size=shard_size)
    mixed = precision == "bf16-mixed"
    low = 2 if mixed or param_dtype == "bfloat16" else 4  # bytes of compute weights / gradients
    buffers = transient = 0
    if strategy in ("single", "ddp"):
        params, grads = low * total, low * total
        master = 4 * total if mixed else 0
        if strategy == "ddp":
            buffers = grads  # DDP buckets, gradient_as_bucket_view=False (default)
    elif strategy in ("zero1", "zero2"):
        params = low * total
        grads = low * total if strategy == "zero1" else low * e
        master = 4 * e  # DeepSpeed always steps an fp32 clone of the partition
        transient = 4 * e  # the flat fp32 gradient of the partition, built at step()
    elif strategy == "zero3":
        # Parameters under stage3_param_persistence_threshold stay gathered on every rank.
        persistent = sum(_numel(s) for s in shapes if _numel(s) < ZERO3_PERSISTENCE_THRESHOLD)
        params, grads = low * (e + persistent), low * e
        master = 4 * e  # a clone even in fp32 (see the module docstring)
        transient = 2 * low * largest_unit  # gathered unit + prefetched next one
    else:  # fsdp2, hsdp: sharded fp32 params are the master weights under MixedPrecisionPolicy
        sharded = 2 if param_dtype == "bfloat16" else 4
        params, grads, master = sharded * e_pad, sharded * e_pad, 0
        transient = 2 * low * largest_unit
    state = {name: slots * 4 * e for name, slots in OPTIMIZERS.items()}
    if low_state:
        state["sgd_sai"] = sgd_sai_state_bytes(
            shapes, strategy, world_size, momentum_dtype, param_dtype, rank=rank, shard_size=shard_size
        )
    host: dict[str, int] = {}
    if offload:
        if strategy in ("fsdp2", "hsdp"):
            host = {name: params + grads + s for name, s in state.items()}
            params = grads = 0
        else:
            host = {name: master + s for name, s in state.items()}
        master = 0
        state = dict.fromkeys(state, 0)
    return RankMemory(
        strategy=strategy,
        world_size=world_size,
        precision=precision,
        offload=offload,
        buffer_elements=e,
        params=params,
        grads=grads,
        master=master,
        buffers=buffers,
        transient=transient,
        state=state,
        host=host,
        shard_size=(shard_size or world_size) if strategy == "hsdp" else None,
    )


def sgd_sai_scalar_bytes(num_tensors: int) -> int:
    """CPU bytes of SGD-SaI's per-tensor scalars (g-SNR, scale, max: 3 float32 each)."""
    return 3 * 4 * num_tensors


def sgd_sai_state_bytes(
    shapes: Sequence[Shape],
    strategy: str,
    world_size: int,
    momentum_dtype: str | None,
    param_dtype: str = "float32",
    *,
    rank: int = 0,
    shard_size: int | None = None,
) -> int:
    """Exact bytes of SGD-SaI's momentum state on ``rank``: per parameter, its local
    elements (the whole tensor for single/ddp, the dim-0 shard for fsdp2/hsdp) stored as
    :func:`sai_dist.momentum.storage_dtype` says (2 B bf16, 1 B + a 4 B scale per block of
    2048 for int8, 4 B for parameters under 4096 elements under int8, the parameter's
    dtype for ``None``). DeepSpeed ZeRO: see :func:`_zero_state_bytes`."""
    import torch

    from sai_dist import momentum as lowp

    dtype = torch.bfloat16 if param_dtype == "bfloat16" else torch.float32
    if strategy.startswith("zero"):
        return _zero_state_bytes(shapes, strategy, world_size, momentum_dtype, rank)
    n = (shard_size or world_size) if strategy == "hsdp" else world_size
    total = 0
    for s in shapes:
        numel = _numel(s)
        local = numel if strategy in ("single", "ddp") else _dim0_shard(s, n, rank % n)[0]
        total += lowp.state_bytes(momentum_dtype, numel, [local] if local else [], dtype)
    return total


def _zero_state_bytes(
    shapes: Sequence[Shape], strategy: str, world_size: int, momentum_dtype: str | None, rank: int
) -> int:
    r"""SGD-SaI's momentum state on ``rank`` of DeepSpeed ZeRO (one param group, one ZeRO-3
    sub-group): one buffer of the rank's flat fp32 partition (:math:`E` elements, padding
    included, :func:`buffer_elements`), whose pieces are the segments of the parameters it
    holds (:mod:`sai_dist.layouts.zero`). Under int8 the buffer is int8 codes (1 B per
    element of the partition) when at least one piece belongs to a parameter of 4096
    elements or more, with a 4 B scale per block of 2048 of each such piece, and the pieces
    of smaller parameters are kept in float32 beside it (4 B each:
    :class:`sai_dist.momentum.PieceStorage`); otherwise the buffer is float32. ZeRO-1/2 lay the
    parameters end to end and rank :math:`r` holds :math:`[rE, (r+1)E)`; ZeRO-3 gives every
    parameter :math:`\lceil n_p/N \rceil` elements per rank, rank :math:`r` holding
    :math:`[r c_p, \min((r+1) c_p, n_p))` of it."""
    import torch

    from sai_dist import momentum as lowp

    e, _ = buffer_elements(shapes, strategy, world_size, rank=rank)
    numels: list[int] = []
    lengths: list[int] = []
    if strategy == "zero3":
        for s in shapes:
            n = _numel(s)
            part = -(-n // world_size)
            held = max(0, min(part, n - rank * part))
            if held:
                numels.append(n)
                lengths.append(held)
    else:
        lo, hi, off = rank * e, (rank + 1) * e, 0
        for s in shapes:
            n = _numel(s)
            held = min(off + n, hi) - max(off, lo)
            if held > 0:
                numels.append(n)
                lengths.append(held)
            off += n
    return lowp.state_bytes(momentum_dtype, numels, lengths, torch.float32, buffer_numel=e)
