"""Rank functions and the single-process reference for tests/distributed/test_tensor_parallel.py and
tests/distributed/test_pipeline_parallel.py: a tiny decoder-only model under TP, FSDP2 x TP, PP x FSDP2
and PP x FSDP2 x TP, with real ``torch.distributed.pipelining`` schedules.

The model (vocab 16, width 8, 2 heads, 2 blocks) has the parameters torchtitan's models
have: an embedding, per block two LayerNorms, q/k/v/o projections and an MLP with biases,
a final norm and an output head. Tensor parallel follows torchtitan's plan: q, k, v and
the MLP's first linear ``ColwiseParallel`` (weights and bias ``Shard(0)`` on ``tp``), o
and the second linear ``RowwiseParallel`` (weight ``Shard(1)``, bias ``Replicate``); norms,
embedding and head are not tensor-parallel (they live on the ``dp`` sub-mesh only, or are
plain tensors without FSDP2). FSDP2 shards every block and the stage root on ``dp``.

Every step uses the same global batch on every configuration: a data-parallel rank trains
on its contiguous slice with the mean loss, and a pipeline splits the slice into
micro-batches whose (mean) losses the schedule averages, so every configuration's gradient
is the single-process gradient of the mean loss over the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import sai_dist
from sai_dist.names import unwrapped_name

VOCAB, DIM, HEADS, SEQ = 16, 8, 2, 6
LAYERS = 2
GLOBAL_BATCH = 4
MICROBATCHES = 2
STEPS = 5
SAVE_AT = 3
LR = 0.05


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.q = nn.Linear(DIM, DIM, bias=False)
        self.k = nn.Linear(DIM, DIM, bias=False)
        self.v = nn.Linear(DIM, DIM, bias=False)
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.norm2 = nn.LayerNorm(DIM)
        self.w1 = nn.Linear(DIM, 2 * DIM)
        self.w2 = nn.Linear(2 * DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        # Under TP the projections return this rank's heads only: infer their number.
        q, k, v = (f(h).view(b, t, -1, DIM // HEADS).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.w2(F.gelu(self.w1(self.norm2(x))))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed: nn.Module | None = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.norm: nn.Module | None = nn.LayerNorm(DIM)
        self.head: nn.Module | None = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) if self.embed is not None else x
        for layer in self.layers.values():
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.head(h) if self.head is not None else h


def make_model() -> Decoder:
    torch.manual_seed(0)
    model = Decoder()
    with torch.no_grad():  # LayerNorm starts at (1, 0): perturb it so its g-SNR is generic
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Matrices decayed, 1-D parameters not, as a user would split them."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2]
    rest = [p for n, p in named if p.ndim < 2]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def reference(steps: int = STEPS) -> dict[str, Any]:
    """Single-process SGDSaI on the whole model and the global batches."""
    model = make_model()
    opt = sai_dist.SGDSaI(groups(model), lr=LR)
    for step in range(steps):
        x, y = batch(step)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "table": sai_dist.gsnr_table(model, opt),
    }


# -- building one rank's part -----------------------------------------------------------


def _mesh(pp: int, dp: int, tp: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


def _stage_module(model: Decoder, stage: int, stages: int) -> Decoder:
    """Keep this stage's layers only (torchtitan's way of splitting a model)."""
    if stages == 1:
        return model
    per = LAYERS // stages
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    for name in list(model.layers):
        if name not in keep:
            del model.layers[name]
    if stage != 0:
        model.embed = None
    if stage != stages - 1:
        model.norm = None
        model.head = None
    return model


def _parallelize(model: Decoder, mesh: Any, dp: int, tp: int) -> Decoder:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if tp > 1:
        plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel()}
        plan.update(o=RowwiseParallel(), w1=ColwiseParallel(), w2=RowwiseParallel())
        for block in model.layers.values():
            parallelize_module(block, mesh["tp"], plan)
    if dp > 1:
        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def _full(p: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


class Run:
    """One rank's part of a (pp, dp, tp) configuration: model part, optimizer, schedule."""

    def __init__(self, pp: int, dp: int, tp: int, extra: dict[str, Any] | None = None) -> None:
        extra = extra or {}
        self.mesh = mesh = _mesh(pp, dp, tp)
        self.coord = dict(zip(("pp", "dp", "tp"), mesh.get_coordinate(), strict=True))
        self.stage = stage = self.coord["pp"]
        self.model = model = _parallelize(_stage_module(make_model(), stage, pp), mesh, dp, tp)
        kwargs = dict(extra.get("opt", {}))
        if extra.get("pipeline_group"):  # plain-tensor stages name the group holding them all
            kwargs.update(pipeline_group=mesh.get_group("pp"), check_ranks=False)
        self.opt = sai_dist.SGDSaI(groups(model), lr=LR, **kwargs)
        self.schedule = None
        if pp > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            pp_stage = PipelineStage(model, stage, pp, torch.device("cpu"), group=mesh.get_group("pp"))
            kind = Schedule1F1B if extra.get("schedule") == "1f1b" else ScheduleGPipe
            self.schedule = kind(pp_stage, MICROBATCHES, loss_fn=loss_fn)
        per = GLOBAL_BATCH // dp
        self.rows = slice(self.coord["dp"] * per, (self.coord["dp"] + 1) * per)

    def steps(self, start: int, stop: int) -> list[dict[str, int]]:
        """Train steps ``start..stop-1``; the collectives of each ``opt.step()``."""
        from tests.support.collectives import CollectiveCounter

        counts: list[dict[str, int]] = []
        for step in range(start, stop):
            x, y = batch(step)
            x, y = x[self.rows], y[self.rows]
            if self.schedule is None:
                loss_fn(self.model(x), y).backward()
            elif self.stage == 0:
                self.schedule.step(x)
            else:
                self.schedule.step(target=y, losses=[])
            with CollectiveCounter() as counter:
                self.opt.step()
            counts.append(dict(counter.counts))
            self.opt.zero_grad()
        return counts

    def report(self) -> dict[str, Any]:
        model, opt = self.model, self.opt
        return {
            "coord": self.coord,
            "params": {unwrapped_name(model, n): _full(p) for n, p in model.named_parameters()},
            "table": sai_dist.gsnr_table(model, opt),
            "whole_table": sai_dist.gsnr_table(model, opt, whole_model=True),
            "placements": {
                unwrapped_name(model, n): str(getattr(p, "placements", "plain"))
                for n, p in model.named_parameters()
            },
        }


def train(
    rank: int, world: int, pp: int, dp: int, tp: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train the (pp, dp, tp) configuration for STEPS steps; return this rank's part."""
    run = Run(pp, dp, tp, extra)
    counts = run.steps(0, STEPS)
    out = {**run.report(), "step_counts": counts}
    if pp > 1 and dp > 1:  # a pipeline group that holds one stage only (the dp group)
        group = run.mesh.get_group("dp")
        build = lambda: sai_dist.SGDSaI(groups(run.model), pipeline_group=group)
        out["dp_as_pipeline_group"] = _outcome(build)
    return out


def checkpoints(rank: int, world: int, path: str) -> dict[str, Any]:
    """DCP per stage: train (2, 2, 1) for SAVE_AT steps and save, then to STEPS. Resume
    from the checkpoint at the same degrees (must be bit-identical) and at (2, 1, 2) and
    (1, 2, 2) (resharded: FSDP2 -> TP, and two stages -> one)."""
    from sai_dist import checkpoint

    out: dict[str, Any] = {}
    first = Run(2, 2, 1)
    first.steps(0, SAVE_AT)
    checkpoint.save(path, first.model, first.opt)
    first.steps(SAVE_AT, STEPS)
    out["first"] = first.report()
    for degrees in ((2, 2, 1), (2, 1, 2), (1, 2, 2)):
        run = Run(*degrees)
        checkpoint.load(path, run.model, run.opt)
        loaded = sai_dist.gsnr_table(run.model, run.opt)
        counts = run.steps(SAVE_AT, STEPS)
        out[degrees] = {**run.report(), "loaded_table": loaded, "step_counts": counts}
    dist.barrier()
    return out


def launch(rank: int, world: int, pp: int, dp: int, tp: int, extra: dict[str, Any] | None = None) -> Any:
    assert pp * dp * tp == world
    out = train(rank, world, pp, dp, tp, extra)
    dist.barrier()
    return out


# -- bad input ----------------------------------------------------------------------------


def _outcome(fn: Any) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _untouched(params: list[nn.Parameter], before: list[Tensor], opt: sai_dist.SGDSaI) -> bool:
    return all(torch.equal(p, q) for p, q in zip(params, before, strict=True)) and not opt.state


def bad_input(rank: int, world: int) -> dict[str, Any]:
    """Refusals on 2 ranks: meshes of two roots, Partial on a 2-D mesh, a pipeline group
    without this rank, stages that disagree on lr, a stage that refuses the g-SNR step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    out: dict[str, Any] = {}
    a = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    b = init_device_mesh("cpu", (world, 1), mesh_dim_names=("x", "y"))
    on_a = nn.Parameter(distribute_tensor(torch.ones(4, 2), a["tp"], [Shard(0)]))
    on_b = nn.Parameter(distribute_tensor(torch.ones(4, 2), b["y"], [Shard(0)]))
    out["roots"] = _outcome(lambda: sai_dist.SGDSaI([on_a, on_b]))
    partial = nn.Parameter(DTensor.from_local(torch.ones(2), a, [Shard(0), Partial()]))
    out["partial"] = _outcome(lambda: sai_dist.SGDSaI([on_a, partial]))
    mine = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    stranger = mine[(rank + 1) % world]
    out["stranger_group"] = _outcome(lambda: sai_dist.SGDSaI([on_a], pipeline_group=stranger))

    # Two plain-tensor "stages" (different tensors per rank) sharing one normaliser.
    def stage(lr: float, grad: float = 1.0) -> tuple[list[nn.Parameter], sai_dist.SGDSaI]:
        g = torch.Generator().manual_seed(rank)
        params = [nn.Parameter(torch.randn(3 + rank, 2, generator=g)) for _ in range(2)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * grad
        world_group = dist.group.WORLD
        return params, sai_dist.SGDSaI(params, lr=lr, pipeline_group=world_group, check_ranks=False)

    params, opt = stage(lr=0.1 if rank == 0 else 0.2)
    before = [p.detach().clone() for p in params]
    out["lr"] = _outcome(opt.step)
    out["lr_untouched"] = _untouched(params, before, opt)
    params, opt = stage(lr=0.1, grad=float("nan") if rank == 1 else 1.0)
    before = [p.detach().clone() for p in params]
    out["refusal"] = _outcome(opt.step)
    out["refusal_untouched"] = _untouched(params, before, opt)
    # Agreeing stages after the refusals: the whole-model max is the larger stage max.
    params, opt = stage(lr=0.1)
    opt.step()
    local = max(float(p.grad.norm() / p.grad.std()) for p in params)
    out["local_max"] = local
    out["gsnr_max"] = float(opt.state[params[0]]["gsnr_max"])
    return out


# -- model parts: virtual stages of an interleaved schedule ----------------------------


def _part_module(part: int) -> Decoder:
    """Part ``part`` of 4: the embedding, block 0, block 1, the final norm and head."""
    model = make_model()
    keep = {1: "0", 2: "1"}.get(part)
    for name in list(model.layers):
        if name != keep:
            del model.layers[name]
    if part != 0:
        model.embed = None
    if part != 3:
        model.norm = None
        model.head = None
    return model


def train_parts(rank: int, world: int, mode: str) -> dict[str, Any]:
    """2 ranks x 2 parts each (rank r holds parts r and r + 2) under
    ScheduleInterleaved1F1B, plain tensors, ``pipeline_group`` = the world. ``mode``:
    ``"one"`` = one SGDSaI over both parts, ``"linked"`` = one per part + link_parts,
    ``"unlinked"`` = one per part without it (the negative control)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B

    parts = [rank, rank + world]
    modules = [_part_module(p) for p in parts]
    cpu = torch.device("cpu")
    stages = [PipelineStage(m, p, 2 * world, cpu) for m, p in zip(modules, parts, strict=True)]
    schedule = ScheduleInterleaved1F1B(stages, MICROBATCHES, loss_fn=loss_fn)
    kwargs = {"lr": LR, "pipeline_group": dist.group.WORLD, "check_ranks": False}
    if mode == "one":
        both = [
            {"params": [p for m in modules for p in groups(m)[0]["params"]]},
            {"params": [p for m in modules for p in groups(m)[1]["params"]], "weight_decay": 0.0},
        ]
        optimizers = [sai_dist.SGDSaI(both, **kwargs)]
    else:
        optimizers = [sai_dist.SGDSaI(groups(m), **kwargs) for m in modules]
        if mode == "linked":
            sai_dist.link_parts(optimizers)
    from tests.support.collectives import CollectiveCounter

    counts: list[dict[str, int]] = []
    for step in range(STEPS):
        x, y = batch(step)
        schedule.step(x, target=y) if rank == 0 else schedule.step(target=y)
        with CollectiveCounter() as counter:
            for opt in optimizers:
                opt.step()
        counts.append(dict(counter.counts))
        for opt in optimizers:
            opt.zero_grad()
    table: dict[str, Any] = {}
    params: dict[str, Tensor] = {}
    for m in modules:
        opt = optimizers[0] if mode == "one" else optimizers[modules.index(m)]
        table.update(sai_dist.gsnr_table(m, opt))
        params.update({n: _full(p) for n, p in m.named_parameters()})
    whole = sai_dist.gsnr_table(modules, optimizers * (2 if mode == "one" else 1), whole_model=True)
    dist.barrier()
    out = {"coord": {"rank": rank}, "params": params, "table": table, "step_counts": counts}
    return {**out, "whole_table": whole}
