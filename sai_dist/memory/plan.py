r"""Activation estimates, the per-device planner and the paper's Table 1.

Activation memory is either given by the user or *estimated* (and then labelled so):
for a transformer block without recomputation and with fused (flash/SDPA) attention,
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
eq. 1 without the :math:`5as/h` attention-score term) give :math:`34\,sbh` bytes in 16-bit,
which we scale by the element size (``68 sbh`` in fp32) and multiply by the layers; the
output layer adds the logits and their gradient, :math:`2\,sbV` fp32 elements. This is an
estimate: allocator fragmentation and framework temporaries come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sai_dist.memory.accounting import STRATEGIES, RankMemory, rank_memory
from sai_dist.memory.models import LlamaConfig, ModelSpec, NanoGPTConfig, ViTConfig
from sai_dist.memory.parallel import ParallelMemory

GIB = 1 << 30

#: Table 1 of arXiv 2412.11768 (one A100-80GB, fp32, batch 1, context 1024, peak of the
#: profiler's OPTIMIZER_STATE category), GiB, keyed by our preset name.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "gpt2-xl": {"sgd_sai": 5.93, "adamw": 11.86},
    "llama2-7b": {"sgd_sai": 25.15, "adamw": 49.48},
}


_MIB = 1 << 20


def cuda_block_bytes(nbytes: int) -> int:
    """Bytes of the block PyTorch's CUDA caching allocator hands out for a fresh request
    of ``nbytes`` (defaults of ``c10/cuda/CUDACachingAllocator.cpp``): requests round up to
    512 B; up to 1 MiB they are carved from 2 MiB segments, up to 10 MiB from 20 MiB
    segments, and larger ones get their own segment rounded up to 2 MiB; a block is split
    only when the remainder exceeds 1 MiB, so a large tensor can keep up to 1 MiB of slack.
    The profiler's memory events report block sizes, which is how a GPU measurement of
    optimizer state can exceed the tensors' bytes (see docs/memory.md, Table 1).
    """
    size = max(512, -(-nbytes // 512) * 512)
    if size < 10 * _MIB:
        return size
    segment = -(-size // (2 * _MIB)) * (2 * _MIB)
    return segment if segment - size <= _MIB else size


def largest_unit(module: nn.Module) -> int:
    """Parameters of the largest child of the model's biggest ``nn.ModuleList`` (the unit
    FSDP2/ZeRO-3 gathers at a time for a transformer), or of the whole model if none."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return sum(p.numel() for p in module.parameters())
    biggest = max(lists, key=len)
    return max(sum(p.numel() for p in child.parameters()) for child in biggest)


def estimate_activations(spec: ModelSpec, batch: int, seq: int, precision: str, tp: int = 1) -> int | None:
    """Estimated activation bytes of one micro-batch (see module docstring), or ``None``
    for a model whose family is unknown (a factory): the user must give ``--activation-mem``.

    Under tensor parallel without sequence parallel a layer keeps :math:`sbh(10 + 24/t)`
    bytes in 16-bit (Korthikanti et al. eq. 2: the norms' and dropouts' inputs stay whole);
    :math:`t = 1` is the 34 sbh above. Under 1F1B pipelining the first stage holds
    :math:`p` micro-batches of :math:`L/p` layers, i.e. the same :math:`L` layers' worth
    (their §4.2.3), so ``pp`` changes nothing here; the logits term is kept on every stage
    (the head is replicated across ``tp``), which over-counts the stages without it."""
    c = spec.config
    elem = 2 if precision == "bf16-mixed" else 4
    if isinstance(c, NanoGPTConfig):
        layers, h, vocab = c.n_layer, c.n_embd, c.vocab_size
    elif isinstance(c, LlamaConfig):
        layers, h, vocab = c.n_layer, c.dim, c.vocab_size
    elif isinstance(c, ViTConfig):
        seq = (c.image_size // c.patch_size) ** 2 + 1
        layers, h, vocab = c.depth, c.width, 0
    else:
        return None
    per_layer = seq * batch * h * (10 * tp + 24) * elem // (2 * tp)
    return layers * per_layer + 2 * seq * batch * vocab * 4


@dataclass
class Verdict:
    strategy: str
    optimizer: str
    total: int
    budget: int

    @property
    def margin(self) -> int:
        return self.budget - self.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0


def plan(
    spec: ModelSpec,
    budget: int,
    activations: int,
    *,
    world_size: int,
    precision: str,
    offload: bool,
    shard_size: int | None,
    strategies: tuple[str, ...] = STRATEGIES,
    optimizers: tuple[str, ...] = ("sgd_sai", "adamw"),
    momentum_dtype: str | None = None,
    param_dtype: str = "float32",
) -> list[tuple[RankMemory, list[Verdict]]]:
    """For each strategy, whether each optimizer fits ``budget`` device bytes per rank."""
    shapes = [s for _, s in spec.params]
    unit = largest_unit(spec.module)
    out = []
    for strategy in strategies:
        mem = rank_memory(
            shapes,
            strategy,
            world_size,
            precision,
            offload,
            shard_size=shard_size,
            largest_unit=unit,
            momentum_dtype=momentum_dtype,
            param_dtype=param_dtype,
        )
        out.append((mem, [Verdict(strategy, o, mem.total(o, activations), budget) for o in optimizers]))
    return out


def parallel_verdicts(
    parallel: ParallelMemory,
    budget: int,
    activations: int,
    optimizers: tuple[str, ...] = ("sgd_sai", "adamw"),
) -> list[tuple[RankMemory, list[Verdict]]]:
    """:func:`plan` under ``--tp/--pp``: each optimizer's verdict for the stage whose rank
    needs the most for it (``fsdp2`` on the data-parallel ranks)."""
    mem = parallel.busiest.memory
    return [(mem, [Verdict("fsdp2", o, parallel.total(o, activations), budget) for o in optimizers])]
