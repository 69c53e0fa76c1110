"""Rank side of tests/distributed/test_memory_parallel3d.py: the bytes one rank of a
(pp, dp, tp) layout really holds, to compare with ``sai_dist.memory.parallel``.

The model is a tiny decoder whose shapes make every accounting rule occur:

* vocabulary 127: the embedding and head (127 x 40 = 5080 elements, int8 under
  ``momentum_dtype="int8"``) split 64 / 63 rows over 2 FSDP2 ranks (uneven shards, padded
  storage, 2 int8 scales each);
* a fused ``qkv`` (120 x 40 = 4800, int8) that tensor parallel splits over its rows: each TP
  rank holds 2400 elements, so 2 scales (the whole tensor would have 3);
* ``o``, ``up``, ``down`` (1600 and 2560 elements) and the norms and biases below 4096
  elements, so they keep float32 momentum under int8 (the small-tensor rule on the
  original size); being small, the row-parallel ``o`` and ``down`` are accepted by
  SGDSaI under int8 (it refuses low-precision momentum on ``Shard(1)`` tensors);
* 3 blocks, so 2 pipeline stages split them 2 / 1.

The TP plan is the accounting's default: ``qkv``, ``up`` column-parallel, ``o``, ``down``
row-parallel, norms, embedding and head replicated; FSDP2 on ``dp`` when ``dp > 1``; a
pipeline stage keeps its own modules (the others are deleted, as torchtitan splits a
model). Each configuration runs one forward/backward and one ``SGDSaI`` step per momentum
dtype: this measures memory, not numerics (the fused qkv split across TP ranks computes
something other than the single-process attention; tests/distributed/test_tensor_parallel.py
checks the numerics of TP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB, DIM, HEADS, HIDDEN, BLOCKS, SEQ, BATCH = 127, 40, 2, 64, 3, 5, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.norm2 = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(self.norm1(x))  # under TP: this rank's rows of the fused projection
        q, k, v = (z.reshape(b, t, -1, DIM // HEADS).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed: nn.Module | None = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.norm: nn.Module | None = nn.LayerNorm(DIM)
        self.head: nn.Module | None = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) if self.embed is not None else x
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.head(h) if self.head is not None else h


def build() -> Decoder:
    """The whole model (also the accounting's input, built on the meta device)."""
    torch.manual_seed(0)
    return Decoder()


def _stage(model: Decoder, stage: int, pp: int) -> Decoder:
    from sai_dist.memory.parallel import stage_blocks

    if pp == 1:
        return model
    keep = stage_blocks(BLOCKS, pp)[stage]
    model.layers = nn.ModuleList(b for i, b in enumerate(model.layers) if i in keep)
    if stage != 0:
        model.embed = None
    if stage != pp - 1:
        model.norm = None
        model.head = None
    return model


def _local_bytes(t: Tensor) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def _padded_param_bytes(model: nn.Module) -> int:
    """FSDP2's sharded parameter storage on this rank (padded to whole chunks)."""
    total = 0
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        group = get_state()._fsdp_param_group if get_state is not None else None
        if group is not None:
            for fp in group.fsdp_params:
                data = fp._sharded_param_data
                total += data.numel() * data.element_size()
    return total


def run(rank: int, world: int, pp: int, dp: int, tp: int, dtypes: list[str]) -> dict[str, Any]:
    """One step per momentum dtype; this rank's bytes (or the optimizer's refusal)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import sai_dist

    mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    coord = dict(zip(("pp", "dp", "tp"), mesh.get_coordinate(), strict=True))
    out: dict[str, Any] = {"rank": rank, "coord": coord, "dtypes": {}}
    for momentum_dtype in dtypes:
        model = _stage(build(), coord["pp"], pp)
        if tp > 1:
            plan = {"qkv": ColwiseParallel(), "o": RowwiseParallel()}
            plan.update(up=ColwiseParallel(), down=RowwiseParallel())
            for block in model.layers:
                parallelize_module(block, mesh["tp"], plan)
        if dp > 1:
            for block in model.layers:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        opt = sai_dist.SGDSaI(model.parameters(), lr=0.01, momentum_dtype=momentum_dtype)
        g = torch.Generator().manual_seed(7)  # the same batch everywhere: bytes do not depend on it
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        x = tokens if model.embed is not None else torch.randn(BATCH, SEQ, DIM, generator=g)
        y = model(x)
        if model.head is not None:
            loss = F.cross_entropy(y.reshape(-1, VOCAB), tokens.reshape(-1))
        else:
            loss = y.square().mean()
        loss.backward()
        entry: dict[str, Any] = {}
        try:
            opt.step()
        except ValueError as exc:
            entry["refused"] = str(exc)
        entry["params_local"] = sum(_local_bytes(p) for p in model.parameters())
        entry["params_padded"] = _padded_param_bytes(model) if dp > 1 else entry["params_local"]
        entry["grads_local"] = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        entry["state"] = sum(
            _local_bytes(v)
            for st in opt.state.values()
            for k, v in st.items()
            if k in ("momentum_buffer", "momentum_scale")
        )
        entry["int8_tensors"] = sum(
            1 for st in opt.state.values() if st.get("momentum_buffer", torch.empty(0)).dtype == torch.int8
        )
        out["dtypes"][momentum_dtype] = entry
    return out
