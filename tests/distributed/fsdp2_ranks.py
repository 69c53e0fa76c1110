"""Rank functions and the single-process reference for tests/distributed/test_fsdp2.py.

The model is a tiny transformer classifier with awkward shapes: the head's weight has
dim 0 = 3 (one rank gets an empty shard at 4 ranks), a (2,)-shaped temperature (empty
shards at 3 and 4 ranks), positional embeddings with dim 0 = 5 (uneven everywhere),
1-D LayerNorm/bias parameters, and three param groups (decayed matrices, undecayed 1-D
parameters, embeddings with their own lr and decay).

Every rank trains on its contiguous slice of the global batch with the mean loss over the
slice; FSDP2/HSDP/DDP average gradients over the ranks, so the result equals the
single-process run on the full batch with the mean loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import sai_dist
from sai_dist.names import unwrapped_name

VOCAB, SEQ, DIM, HEADS, HIDDEN, CLASSES = 13, 5, 12, 2, 20, 3
GLOBAL_BATCH = 12
STEPS = 20
SAVE_AT = 10
LR = 0.05


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS)).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, s, DIM))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(0.1 * torch.randn(SEQ, DIM))
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)
        self.temperature = nn.Parameter(torch.tensor([1.0, 0.5]))

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        pooled = self.ln_f(x).mean(1)
        logits = self.head(pooled)
        return logits * self.temperature[0] + self.temperature[1] * logits.square().mean(-1, keepdim=True)


def make_model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Decayed matrices, undecayed 1-D parameters, embeddings with their own lr/decay."""
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "vector": [], "embed": []}
    for name, p in model.named_parameters():
        name = unwrapped_name(model, name)
        kind = "embed" if name.startswith(("embed", "pos")) else "vector" if p.ndim == 1 else "matrix"
        groups[kind].append(p)
    return [
        {"params": groups["matrix"], "weight_decay": 0.1},
        {"params": groups["vector"], "weight_decay": 0.0},
        {"params": groups["embed"], "weight_decay": 0.02, "lr": 0.5 * LR},
    ]


def make_optimizer(model: nn.Module) -> sai_dist.SGDSaI:
    return sai_dist.SGDSaI(param_groups(model), lr=LR, momentum=0.9)


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    return tokens, labels


def rank_slice(step: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    tokens, labels = batch(step)
    n = GLOBAL_BATCH // world
    return tokens[rank * n : (rank + 1) * n], labels[rank * n : (rank + 1) * n]


def loss_fn(model: nn.Module, tokens: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(model(tokens).float(), labels)


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter as a whole plain fp32 tensor (all-gathers DTensors: collective)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[unwrapped_name(model, name)] = t.detach().float().clone()
    return out


def reference(steps: int = STEPS, snapshots: tuple[int, ...] = (SAVE_AT, STEPS)) -> dict[str, Any]:
    """Single-process SGDSaI on the full batch: params after each snapshot step, table."""
    model = make_model()
    opt = make_optimizer(model)
    out: dict[str, Any] = {}
    for step in range(steps):
        loss_fn(model, *batch(step)).backward()
        opt.step()
        opt.zero_grad()
        if step + 1 in snapshots:
            out[step + 1] = full_params(model)
    out["table"] = sai_dist.gsnr_table(model, opt)
    return out


def train_steps(
    model: nn.Module, opt: sai_dist.SGDSaI, rank: int, world: int, start: int, stop: int, counter: Any = None
) -> list[dict[str, int]]:
    """Steps ``start..stop-1`` on this rank's slices; collectives counted in step() only."""
    counts: list[dict[str, int]] = []
    for step in range(start, stop):
        loss_fn(model, *rank_slice(step, rank, world)).backward()
        if counter is None:
            opt.step()
        else:
            with counter() as c:
                opt.step()
            counts.append(dict(c.counts))
        opt.zero_grad()
    return counts


# -- measurements on a trained optimizer ---------------------------------------------


def state_report(model: nn.Module, opt: sai_dist.SGDSaI) -> dict[str, Any]:
    """Per-rank state bytes against 4 x local shard elements, and placement checks."""
    from torch.distributed.tensor import DTensor

    state_bytes = 0
    local_elements = 0
    tensors = 0
    bad: list[str] = []
    for name, p in model.named_parameters():
        st = opt.state[p]
        tensors += 1
        local = p.to_local() if isinstance(p, DTensor) else p
        local_elements += local.numel()
        buf = st["momentum_buffer"]
        if isinstance(p, DTensor):
            where = (p.placements, p.device_mesh)
            if not isinstance(buf, DTensor) or (buf.placements, buf.device_mesh) != where:
                bad.append(f"{name}: buffer {type(buf).__name__} {getattr(buf, 'placements', None)}")
            elif buf.to_local().shape != local.shape:
                bad.append(f"{name}: local shape {tuple(buf.to_local().shape)} != {tuple(local.shape)}")
        for value in st.values():
            if isinstance(value, Tensor):
                v = value.to_local() if isinstance(value, DTensor) else value
                state_bytes += v.numel() * v.element_size()
    return {
        "state_bytes": state_bytes,
        "local_elements": local_elements,
        "tensors": tensors,
        "bad": bad,
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "buffer_dtypes": sorted({str(s["momentum_buffer"].dtype) for s in opt.state.values()}),
    }


# -- rank functions -------------------------------------------------------------------


def _shard(model: nn.Module, mesh: Any, mp_policy: Any = None) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _mesh(world: int, hsdp: bool) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if hsdp:
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))


def sharded_run(rank: int, world: int, hsdp: bool, save_dir: str | None) -> dict[str, Any]:
    """FSDP2 (or HSDP 2 x world/2) for STEPS steps; counts, state, table, params."""
    from tests.support.collectives import CollectiveCounter

    model = _shard(make_model(), _mesh(world, hsdp))
    opt = make_optimizer(model)
    layout = type(opt.layout).__name__
    counts = train_steps(model, opt, rank, world, 0, SAVE_AT, CollectiveCounter)
    if save_dir is not None:
        from sai_dist import checkpoint

        checkpoint.save(save_dir, model, opt)
    counts += train_steps(model, opt, rank, world, SAVE_AT, STEPS, CollectiveCounter)
    # Positive control: the counter does see a DTensor redistribution and a plain collective.
    with CollectiveCounter() as control:
        next(iter(model.parameters())).full_tensor()
        dist.all_reduce(torch.zeros(1))
    return {
        "layout": layout,
        "step_counts": counts,
        "control": control.total,
        "state": state_report(model, opt),
        "table": sai_dist.gsnr_table(model, opt),
        "params": full_params(model),
    }


def resumed_run(rank: int, world: int, load_dir: str) -> dict[str, Any]:
    """Load a checkpoint saved at another world size after SAVE_AT steps; continue."""
    from sai_dist import checkpoint

    model = _shard(make_model(), _mesh(world, False))
    opt = make_optimizer(model)
    checkpoint.load(load_dir, model, opt)
    loaded_table = sai_dist.gsnr_table(model, opt)
    state = state_report(model, opt)
    train_steps(model, opt, rank, world, SAVE_AT, STEPS)
    return {
        "loaded_table": loaded_table,
        "table": sai_dist.gsnr_table(model, opt),
        "state": state,
        "params": full_params(model),
    }


def accumulation_run(rank: int, world: int) -> dict[str, Any]:
    """Two micro-batches per step, gradient sync only on the last (the FSDP2 recipe)."""
    model = _shard(make_model(), _mesh(world, False))
    opt = make_optimizer(model)
    for step in range(STEPS):
        tokens, labels = rank_slice(step, rank, world)
        half = tokens.shape[0] // 2
        for micro, sl in enumerate((slice(0, half), slice(half, None))):
            model.set_requires_gradient_sync(micro == 1)
            (loss_fn(model, tokens[sl], labels[sl]) / 2).backward()
        opt.step()
        opt.zero_grad()
    return {"table": sai_dist.gsnr_table(model, opt), "params": full_params(model)}


def mixed_precision_run(rank: int, world: int) -> dict[str, Any]:
    """bf16 compute and gradient reduction, fp32 sharded parameters and optimizer state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    model = _shard(make_model(), _mesh(world, False), policy)
    opt = make_optimizer(model)
    train_steps(model, opt, rank, world, 0, STEPS)
    return {
        "table": sai_dist.gsnr_table(model, opt),
        "params": full_params(model),
        "state": state_report(model, opt),
    }


def ddp_run(rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = make_optimizer(model)
    train_steps(model, opt, rank, world, 0, STEPS)
    table = sai_dist.gsnr_table(model, opt)
    return {"layout": type(opt.layout).__name__, "table": table, "params": full_params(model)}


def _plain(obj: Any) -> Any:
    """Tensors as numpy arrays: torch.multiprocessing would pass tensors through shared
    memory handles that die with the rank process."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def launch_4(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    return _plain(
        {
            "fsdp2": sharded_run(rank, world, False, save_dir),
            "hsdp": sharded_run(rank, world, True, None),
            "layout_moments": layout_moments(rank, world),
        }
    )


def launch_3(rank: int, world: int) -> dict[str, Any]:
    return _plain({"fsdp2": sharded_run(rank, world, False, None)})


def launch_2(rank: int, world: int, load_dir: str) -> dict[str, Any]:
    return _plain(
        {
            "fsdp2": sharded_run(rank, world, False, None),
            "resumed": resumed_run(rank, world, load_dir),
            "accumulation": accumulation_run(rank, world),
            "mixed": mixed_precision_run(rank, world),
            "ddp": ddp_run(rank, world),
            "refusals": refusals(rank, world),
        }
    )


# -- the layout on hand-built DTensors ------------------------------------------------


def layout_moments(rank: int, world: int) -> dict[str, Any]:
    """Block moments through DTensorLayout vs torch on the whole tensors, on a 2 x 2 mesh
    with Shard/Replicate mixes, uneven and empty shards, and a plain tensor mixed in."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sai_dist.layouts.dtensor import DTensorLayout
    from sai_dist.stats import reduce_block_moments

    mesh = init_device_mesh("cpu", (2, world // 2))
    g = torch.Generator().manual_seed(7)
    wholes = [
        3.0 + torch.randn(5, 3, generator=g),  # uneven Shard(0) over the shard dim
        torch.randn(1, 4, generator=g),  # dim 0 = 1: empty shards
        torch.randn(6, 2, generator=g),
        torch.randn(4, generator=g),
        torch.randn(3, 3, generator=g),  # plain tensor, replicated on every rank
    ]
    placements = [
        (Replicate(), Shard(0)),
        (Replicate(), Shard(0)),
        (Shard(0), Shard(1)),
        (Replicate(), Replicate()),
    ]
    params: list[Tensor] = [distribute_tensor(w, mesh, pl) for w, pl in zip(wholes, placements, strict=False)]
    params.append(wholes[-1].clone())
    layout = DTensorLayout()
    layout.register(params)
    sources = [(layout.local(p), layout.pieces(p)) for p in params]
    moments = reduce_block_moments(sources, layout.num_blocks, layout.group)
    doubles = [w.double() for w in wholes]
    rows = [[w.numel(), w.sum(), w.square().sum(), w.var() * (w.numel() - 1)] for w in doubles]
    expected = torch.tensor(rows, dtype=torch.float64)
    got = torch.stack([moments.count, moments.total, moments.sumsq, moments.m2], 1)
    return {"expected": expected, "got": got, "local_numels": [layout.local(p).numel() for p in params]}


# -- refusals -------------------------------------------------------------------------


def refusals(rank: int, world: int) -> dict[str, str]:
    """The messages SGDSaI gives for tensors it cannot map: Partial placements, meshes over
    different ranks and a tensor it was never given (FSDP1 without its layout:
    tests/distributed/test_fsdp1.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from sai_dist.layouts import LayoutError

    out: dict[str, str] = {}
    mesh = init_device_mesh("cpu", (world,))
    sub = init_device_mesh("cpu", (world, 1), mesh_dim_names=("a", "b"))["b"]
    whole = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    partial = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    cases = {
        "partial": lambda: sai_dist.SGDSaI([nn.Parameter(partial)]),
        "meshes": lambda: sai_dist.SGDSaI(
            [nn.Parameter(whole), nn.Parameter(distribute_tensor(torch.ones(2), sub, [Shard(0)]))]
        ),
    }
    for key, build in cases.items():
        try:
            build()
            out[key] = "no error"
        except LayoutError as e:
            out[key] = str(e)
    opt = sai_dist.SGDSaI([nn.Parameter(whole)])
    stranger = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
    try:
        opt.layout.pieces(stranger)
        out["stranger"] = "no error"
    except LayoutError as e:
        out["stranger"] = str(e)
    return out
