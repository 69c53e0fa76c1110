"""The job under tensor and pipeline parallelism: ``sai-dist train --tp N --pp M`` (FSDP2 on
the remaining ranks), the torchtitan arrangement.

Layout: ``world = pp * dp * tp`` ranks on one root mesh ``init_device_mesh(("pp", "dp",
"tp"))``. Within a pipeline stage every block is tensor-parallel on ``mesh["tp"]`` (``q``,
``k``, ``v`` and ``mlp.fc`` column-wise, ``attn.proj`` and ``mlp.proj`` row-wise, so each TP
rank holds ``n_heads / tp`` whole heads and ``4 d_model / tp`` MLP units; norms, embeddings
and head stay whole), then ``fully_shard`` on ``mesh["dp"]`` per block and on the stage root.
Stage ``s`` holds blocks ``stage_blocks(n_layers, pp)[s]``; stage 0 also the embeddings, the
last stage ``ln_f``, the head and the loss. Every stage keeps the whole model's parameter
names (:func:`keep_stage`), so g-SNR tables, checkpoint keys and the model signature are the
single-process ones. Steps run through ``torch.distributed.pipelining`` (``PipelineStage``
and ``ScheduleGPipe``) with ``--microbatches`` equal micro-batches of this data-parallel
rank's rows.

Why every configuration trains the single-process job's model on the same global batch:
data-parallel coordinate ``d`` takes rows ``[d b, (d+1) b)`` with ``b = global_batch / dp``
(the ranks of one coordinate see the same rows); the schedule splits them into ``m`` equal
micro-batches and scales gradients by ``1/m``, so the gradient is that of the mean of the
micro-batch means, which for equal micro-batches is the mean over the ``b`` rows; FSDP2
averages over ``dp``. SGD-SaI's normaliser is the largest g-SNR of the whole model: DTensor
stages sliced from the root mesh find the other stages themselves; plain-tensor stages
(``--pp`` alone) name them with ``pipeline_group=mesh.get_group("pp")``
(:mod:`sai_dist.whole_model`). Gradient clipping uses the global norm over every stage.

The checks (:func:`check_model`, :func:`check_degrees`, :func:`check_batch`) are pure
functions: every rank (and the launching process, before it spawns anything) computes the
same refusal from the same config, before any collective, so bad input cannot hang.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sai_dist.stages import data_parallel_degree, stage_blocks


@dataclass(frozen=True)
class Degrees:
    """``pp * dp * tp == world``; ``dp`` is what is left for FSDP2 after TP and PP."""

    pp: int
    dp: int
    tp: int


def check_degrees(
    world_size: int, tp: int, pp: int, n_heads: int, n_layers: int, *, d_model: int | None = None
) -> Degrees:
    """Validate ``--tp``/``--pp`` against the world and the model; return the three degrees.

    Conditions (each refusal names the flag and the fix):
    * ``tp >= 1``, ``pp >= 1``;
    * ``world_size % (tp * pp) == 0`` (the data-parallel degree ``world / (tp * pp)`` is whole);
    * the model conditions of :func:`check_model`.
    """
    fix = "launch a multiple of {n} ranks (--nproc, or the launcher's rank count) or lower --tp/--pp"
    dp = data_parallel_degree(world_size, tp, pp, world="world size", fix=fix)
    check_model(tp, pp, n_heads, d_model, n_layers)
    return Degrees(pp=pp, dp=dp, tp=tp)


def check_model(tp: int, pp: int, n_heads: int, d_model: int | None, n_layers: int) -> None:
    """The model's conditions for ``--tp``/``--pp``:

    * ``d_model % tp == 0`` (and so ``4 d_model % tp``): the column-wise q/k/v and MLP
      ``fc`` outputs and the row-wise projections' inputs split evenly (``d_model=None``:
      not checked);
    * ``n_heads % tp == 0``: column-wise q/k/v keeps whole heads on each TP rank;
    * ``n_layers >= pp``: every stage holds at least one block.
    """
    if d_model is not None and (d_model % tp or (4 * d_model) % tp):
        raise ValueError(
            f"--d-model {d_model} is not divisible by --tp {tp}: tensor parallel splits the "
            f"attention width {d_model} and the MLP width {4 * d_model} evenly over the TP ranks; "
            "choose --tp dividing --d-model"
        )
    if n_heads % tp:
        raise ValueError(
            f"--n-heads {n_heads} is not divisible by --tp {tp}: tensor parallel splits attention by "
            "whole heads; choose --tp dividing --n-heads"
        )
    if n_layers < pp:
        raise ValueError(
            f"--n-layers {n_layers} is fewer than --pp {pp} stages: every stage needs at least one "
            "block; lower --pp or raise --n-layers"
        )


def check_batch(global_batch: int, dp: int, microbatches: int) -> None:
    """``global_batch`` splits into ``dp`` equal row blocks, each into ``microbatches``
    equal micro-batches (equal sizes make the mean of micro-batch means the batch mean)."""
    if global_batch % dp:
        raise ValueError(
            f"--global-batch {global_batch} is not divisible by the data-parallel degree {dp} "
            "(world / (tp * pp)): every data-parallel rank takes the same number of rows"
        )
    rows = global_batch // dp
    if rows % microbatches:
        raise ValueError(
            f"--global-batch {global_batch} gives {rows} rows per data-parallel rank, not divisible by "
            f"--microbatches {microbatches}: micro-batches must be equal for the pipeline's loss to be "
            "the batch mean; choose --microbatches dividing the rows (default: --pp)"
        )


# -- building one rank's part ----------------------------------------------------------------


def keep_stage(model: nn.Module, stage: int, pp: int) -> nn.Module:
    """Cut the whole GPT ``model`` down to pipeline stage ``stage`` of ``pp``, in place.

    Other stages' blocks become ``nn.Identity`` (the ``blocks`` list keeps its indices, so
    ``blocks.<i>.…`` names stay the whole model's); ``tok_emb``/``pos_emb`` (off stage 0)
    and ``ln_f``/``head`` (off the last stage) become ``None``. With ``pp == 1`` nothing
    changes."""
    if pp == 1:
        return model
    keep = stage_blocks(len(model.blocks), pp)[stage]
    for i in range(len(model.blocks)):
        if i not in keep:
            model.blocks[i] = nn.Identity()
    if stage != 0:
        model.tok_emb = None
        model.pos_emb = None
    if stage != pp - 1:
        model.ln_f = None
        model.head = None
    return model


def _real_blocks(model: nn.Module) -> list[nn.Module]:
    return [b for b in model.blocks if not isinstance(b, nn.Identity)]


TP_PLAN_COLWISE = ("attn.q", "attn.k", "attn.v", "mlp.fc")
TP_PLAN_ROWWISE = ("attn.proj", "mlp.proj")


class Parallel:
    """One rank's place in the ``(pp, dp, tp)`` job: its mesh coordinates, its pipeline
    schedule (``None`` without ``--pp``) and the collectives the loop needs (the logged
    loss, the global gradient norm).

    Built by :func:`build`; ``model`` is this rank's stage module (the whole model's
    names), already tensor-parallel and ``fully_shard``-ed."""

    def __init__(self, degrees: Degrees, mesh: Any, model: nn.Module, microbatches: int) -> None:
        self.degrees = degrees
        self.mesh = mesh
        pp_rank, dp_rank, tp_rank = mesh.get_coordinate()
        self.pp_rank, self.dp_rank, self.tp_rank = int(pp_rank), int(dp_rank), int(tp_rank)
        self.is_last = self.pp_rank == degrees.pp - 1
        self.pp_group = mesh.get_group("pp") if degrees.pp > 1 else None
        self.schedule: Any = None
        self.microbatches = microbatches
        if degrees.pp > 1:
            from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

            from sai_dist.train.model import lm_loss

            device = next(model.parameters()).device
            stage = PipelineStage(model, self.pp_rank, degrees.pp, device, group=self.pp_group)
            self.schedule = ScheduleGPipe(stage, microbatches, loss_fn=lm_loss)

    def describe(self) -> str:
        d = self.degrees
        return (
            f"pp {d.pp} x dp {d.dp} x tp {d.tp} (coordinate {self.pp_rank}, {self.dp_rank}, {self.tp_rank})"
        )

    def pipeline_step(self, x: Tensor, y: Tensor, train: bool = True) -> Tensor | None:
        """One schedule run over this rank's rows: forward (and, with ``train``, backward)
        of every micro-batch; returns the mean micro-batch loss on the last stage, ``None``
        elsewhere."""
        losses: list[Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        if self.pp_rank == 0:
            run(x)
        elif self.is_last:
            run(target=y, losses=losses)
        else:
            run()
        if not self.is_last:
            return None
        return torch.stack([loss.detach().float() for loss in losses]).mean()

    def batch_mean(self, local: Tensor | None, device: torch.device) -> float:
        """The global batch's loss on every rank from the last stage's ``local`` losses: each
        last-stage rank adds ``local / (dp * tp)`` (its ``tp`` peers hold the same value), the
        others 0, summed over the world in float64: the mean over data-parallel ranks."""
        value = torch.zeros((), dtype=torch.float64, device=device)
        if local is not None:
            value += local.detach().double() / (self.degrees.dp * self.degrees.tp)
        if dist.get_world_size() > 1:
            dist.all_reduce(value)
        return float(value)

    @torch.no_grad()
    def clip_grad_norm_(self, parameters: Iterable[Tensor], max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: the 2-norm of every
        gradient of every stage, each element once.

        Gradients on one device mesh (DTensors) are normed together and the DTensor norm is
        resolved over that mesh (``full_tensor``: shards summed, replicas counted once);
        plain gradients (replicated over ``tp``) locally; the squares are summed, then over
        the pipeline group (one rank per stage). Scales every gradient by
        ``min(1, max_norm / (norm + 1e-6))``, as torch does; returns the norm."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in parameters if p.grad is not None]
        by_mesh: dict[Any, list[Tensor]] = {}
        for g in grads:
            key = None
            if isinstance(g, DTensor):
                mesh = g.device_mesh
                key = (mesh.mesh_dim_names, tuple(mesh.mesh.flatten().tolist()))
            by_mesh.setdefault(key, []).append(g)
        device = grads[0].device if grads else torch.device("cpu")
        total_sq = torch.zeros((), dtype=torch.float32, device=device)
        for key in sorted(by_mesh, key=repr):  # the same order on every rank of a stage
            norm = torch.nn.utils.get_total_norm(by_mesh[key], 2.0)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            total_sq += norm.float() ** 2
        if self.pp_group is not None:
            dist.all_reduce(total_sq, group=self.pp_group)
        total = float(total_sq.sqrt())
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total


def build(cfg: Any, model: nn.Module, device: torch.device) -> tuple[nn.Module, Parallel, dict[str, Any]]:
    """Make this rank's part of the ``(pp, dp, tp)`` job from the whole ``model``: cut it to
    this rank's stage, apply the TP plan on ``mesh["tp"]``, ``fully_shard`` on
    ``mesh["dp"]``, set up the pipeline schedule. Returns the stage module, the
    :class:`Parallel` and the extra SGD-SaI arguments (the pipeline group for plain-tensor
    stages). Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    degrees = check_degrees(
        dist.get_world_size(), cfg.tp, cfg.pp, cfg.n_heads, cfg.n_layers, d_model=cfg.d_model
    )
    mesh = init_device_mesh(
        device.type, (degrees.pp, degrees.dp, degrees.tp), mesh_dim_names=("pp", "dp", "tp")
    )
    stage = int(mesh.get_coordinate()[0])
    model = keep_stage(model, stage, degrees.pp)
    model.to(device)
    if degrees.tp > 1:
        plan: dict[str, Any] = {name: ColwiseParallel() for name in TP_PLAN_COLWISE}
        plan.update({name: RowwiseParallel() for name in TP_PLAN_ROWWISE})
        for block in _real_blocks(model):
            parallelize_module(block, mesh["tp"], plan)
    if degrees.dp > 1:
        for block in _real_blocks(model):
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    parallel = Parallel(degrees, mesh, model, cfg.num_microbatches)
    extra: dict[str, Any] = {}
    if degrees.pp > 1 and not any(isinstance(p, DTensor) for p in model.parameters()):
        # Plain-tensor stages (no dp, no tp): nothing tells the layout where the other stages
        # are, so name them; and each stage holds different tensors on purpose.
        extra = {"pipeline_group": parallel.pp_group, "check_ranks": False}
    return model, parallel, extra
