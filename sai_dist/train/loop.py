"""The training job itself: one function every rank runs, whatever started it.

Per step ``s`` (0-based): learning rate ``lr_at(s)``, the batch ``train_batch(seed, s)``
(this rank's rows of the global batch), forward under bf16 autocast on CUDA, backward,
global-norm clipping, optimizer step. The logged loss is the mean over ranks, i.e. the loss
of the global batch. Under ``--tp``/``--pp`` (:mod:`sai_dist.train.parallel3d`) the rows are
this rank's data-parallel coordinate's, the step runs through the pipeline schedule, and the
logged loss is the last stage's mean over micro-batches and data-parallel ranks: the same
global-batch loss. Everything a step depends on is either a pure function of ``(seed, s)``
or in the checkpoint, so a resumed run continues with exactly the uninterrupted run's losses.

Each start of the job on a run folder (the first attempt, a ``--resume``, a torchelastic
restart) appends to ``events.jsonl``: which checkpoint it resumed from and whether SGD-SaI's
g-SNR was loaded or computed in this attempt (and at which step), the observable that shows
a resumed run never recomputes it.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

import torch
import torch.distributed as dist

from sai_dist.train import faults, peers
from sai_dist.train import run_checkpoints as ckpt_io
from sai_dist.train.backends import Setup, build, lr_at, set_lr
from sai_dist.train.config import TrainConfig, check_world
from sai_dist.train.data import load_corpus, train_batch, val_batches
from sai_dist.train.distributed import DistEnv, device_for, init
from sai_dist.train.leave import tear_down
from sai_dist.train.model import GPT, GPTConfig, lm_loss
from sai_dist.train.report import plot_gsnr, plot_losses, read_metrics


def default_name(cfg: TrainConfig) -> str:
    return f"{cfg.backend}-{cfg.optimizer}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def run_dir_of_checkpoint(ckpt: str) -> str:
    """``runs/<name>`` for ``runs/<name>/checkpoints/step_N``."""
    return os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().float().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.detach())


def _same_on_every_rank(what: str, value: Any) -> None:
    """Raise on every rank when ranks disagree on ``value`` (a run folder or checkpoint seen
    differently, say): training on would mix two runs, or hang in mismatched collectives."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise RuntimeError(
            f"ranks disagree on {what} ({listing}); is the run folder on a shared file system?"
        )


def _gsnr_state(optimizer: Any) -> tuple[bool, float | None]:
    """``(fixed, gsnr_max)`` of the SGD-SaI inside ``optimizer``; ``(False, None)`` for others."""
    from sai_dist.table import find_sgdsai

    try:
        sai = find_sgdsai(optimizer)
    except TypeError:
        return False, None
    if not sai.initialized:
        return False, None
    from sai_dist.optimizer import GSNR_MAX

    # The normaliser fixed at step 1 is stored with every tensor's state; any one says it.
    gmax = next(float(st[GSNR_MAX]) for st in sai.state.values() if GSNR_MAX in st)
    return True, gmax


class Metrics:
    """Rank 0 appends JSON lines; on resume, records after the checkpoint are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, path: str, keep_until: int | None, active: bool) -> None:
        self.path, self.active = path, active
        if active and keep_until is not None:
            kept = [r for r in read_metrics(path) if r["step"] <= keep_until]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _autocast(device: torch.device):  # type: ignore[no-untyped-def]
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(setup: Setup, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    setup.model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    parallel = setup.parallel
    for x, y in batches:
        with _autocast(device):
            if parallel is not None and parallel.schedule is not None:
                local = parallel.pipeline_step(x.to(device), y.to(device), train=False)
                if local is not None:
                    total += local.double()
            else:
                total += lm_loss(setup.model(x.to(device)), y.to(device)).double()
    setup.model.train()
    if parallel is not None and parallel.schedule is not None:
        return parallel.batch_mean(total / len(batches) if parallel.is_last else None, device)
    return _mean_over_ranks(total / len(batches))


def train(cfg: TrainConfig, env: DistEnv | None, resume: str | None = None) -> dict[str, Any]:
    """Run the job on this rank; returns rank 0's summary (other ranks: the same keys).
    A collective that fails (a peer host dead or unreachable for ``--pg-timeout``) raises
    one error naming the step and the unreachable ranks (:mod:`sai_dist.train.peers`)."""
    with peers.guard() as watch:
        summary = _train(cfg, env, resume, watch)
        # After _train's locals (model, optimizer, meshes) are gone, so the collection in
        # tear_down frees every object that still refers to the process group.
        watch.where = "the end of the job"
        tear_down()
    if cfg.backend == "deepspeed":
        from sai_dist.deepspeed import release_shm_workspace

        release_shm_workspace(env.rank if env is not None else 0)
    return summary


def _train(cfg: TrainConfig, env: DistEnv | None, resume: str | None, watch: peers.Watch) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = device_for(env, cfg.device)
    if env is not None:
        if "OMP_NUM_THREADS" not in os.environ:
            # Share the node's cores among its ranks instead of oversubscribing them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
        init(env, device, cfg.pg_timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_world(cfg, world)
    if env is not None and world > 1:
        peers.check_same_config(cfg.to_json())
        watch.probe, watch.pg_timeout = peers.PeerProbe(env.master_addr), cfg.pg_timeout

    ckpt_path = ckpt_io.resolve(resume) if resume else None
    _same_on_every_rank("the checkpoint to resume from", ckpt_path and os.path.abspath(ckpt_path))
    if ckpt_path:
        run_dir = run_dir_of_checkpoint(ckpt_path)
    else:
        if cfg.name is None:
            cfg.name = _broadcast(default_name(cfg))
        run_dir = os.path.join(cfg.runs_dir, cfg.name)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(cfg.to_json(), f, indent=2)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    gcfg = GPTConfig(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.seq_len, cfg.dropout, qkv=cfg.qkv)
    model = GPT(gcfg)
    n_params = sum(p.numel() for p in model.parameters())
    # What a checkpoint must match to be loaded into this run (and what ours record): the
    # whole model's names and global shapes, taken before a pipeline stage drops the rest.
    expect = {"optimizer": cfg.optimizer, "model": ckpt_io.model_signature(model)}
    local_world = env.local_world_size if env else 1
    setup = build(cfg, model, device, local_world)
    model = setup.model if setup.parallel is not None else model  # this rank's stage
    parallel = setup.parallel
    # Which rows of the global batch this rank trains on: its data-parallel coordinate's.
    shard, shards = (parallel.dp_rank, parallel.degrees.dp) if parallel is not None else (rank, world)

    start = 0
    if ckpt_path:
        start = int(ckpt_io.load(ckpt_path, setup.model, setup.optimizer, setup.engine, expect)["step"])
        if start > cfg.steps:
            raise ValueError(f"checkpoint is at step {start}, beyond --steps {cfg.steps}")
    corpus = load_corpus(cfg.data_dir, cfg.max_bytes)
    val = val_batches(corpus, cfg.seed, cfg.eval_batches, cfg.global_batch, cfg.seq_len, shard, shards)
    metrics = Metrics(os.path.join(run_dir, "metrics.jsonl"), start if ckpt_path else None, rank == 0)
    events = Metrics(os.path.join(run_dir, "events.jsonl"), None, rank == 0)
    if not ckpt_path and rank == 0:
        open(metrics.path, "w").close()
        open(events.path, "w").close()
    meta = {"backend": cfg.backend, "world_size": world, "optimizer": cfg.optimizer, **expect}
    if parallel is not None:
        meta.update(tp=cfg.tp, pp=cfg.pp, optim_state=ckpt_io.FLAT)
    gsnr_fixed, gsnr_max = _gsnr_state(setup.optimizer)
    events.write(
        {
            "event": "start",
            "attempt": faults.restart_count(),
            "step": start,
            "resumed_from": os.path.basename(ckpt_path) if ckpt_path else None,
            "world_size": world,
            # "loaded": the checkpoint carried it; "pending": step 1 (or the first step
            # with gradients) of this attempt will compute it.
            "gsnr": ("loaded" if gsnr_fixed else "pending") if cfg.optimizer == "sgdsai" else None,
            "gsnr_max": gsnr_max,
            "time": time.time(),
        }
    )

    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.backend}x{world} {cfg.optimizer}", unit="step")
    elif rank == 0:
        layout = f" ({parallel.describe()})" if parallel is not None else ""
        print(
            f"[sai-dist train] {run_dir}: {cfg.backend} on {world} rank(s){layout}, {device}, "
            f"{n_params:,} parameters, steps {start}..{cfg.steps}",
            flush=True,
        )

    tokens_per_step = cfg.global_batch * cfg.seq_len
    timed_tokens, timed_s = 0, 0.0
    val_loss = float("nan")
    step_model = setup.engine if setup.engine is not None else setup.model
    for step in range(start, cfg.steps):
        watch.where = f"step {step + 1}"
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        set_lr(setup.optimizer, lr)
        x, y = train_batch(corpus, cfg.seed, step, cfg.global_batch, cfg.seq_len, shard, shards)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if parallel is not None:
            loss_value = _parallel_step(cfg, setup, parallel, x, y, device)
        else:
            with _autocast(device):
                loss = lm_loss(step_model(x), y)
            if setup.engine is not None:
                setup.engine.backward(loss)
                setup.engine.step()
            else:
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(setup.model.parameters(), cfg.grad_clip)
                setup.optimizer.step()
                setup.optimizer.zero_grad(set_to_none=True)
            loss_value = _mean_over_ranks(loss)
        if cfg.optimizer == "sgdsai" and not gsnr_fixed:
            gsnr_fixed, gsnr_max = _gsnr_state(setup.optimizer)
            if gsnr_fixed:
                events.write({"event": "gsnr_computed", "step": step + 1, "gsnr_max": gsnr_max})
        dt = time.perf_counter() - t0
        if step > start:  # the first step of a process includes warm-up and the g-SNR pass
            timed_tokens += tokens_per_step
            timed_s += dt
        done = step + 1
        metrics.write(
            {
                "kind": "train",
                "step": done,
                "loss": loss_value,
                "lr": lr,
                "tokens_per_s": tokens_per_step / dt,
                "step_s": dt,
            }
        )
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_loss = evaluate(setup, val, device)
            metrics.write({"kind": "val", "step": done, "val_loss": val_loss})
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            ckpt_io.save(ckpt_root, done, setup.model, setup.optimizer, setup.engine, meta)
        faults.maybe_die_after_step(done)  # test hook; off unless its variable is set
        if bar is not None:
            bar.set_postfix(
                loss=f"{loss_value:.3f}",
                val=f"{val_loss:.3f}",
                tok_s=f"{tokens_per_step / dt:,.0f}",
                refresh=False,
            )
            bar.update(1)
        elif rank == 0 and (done % cfg.eval_every == 0 or done == cfg.steps):
            print(
                f"step {done}/{cfg.steps} loss {loss_value:.4f} val {val_loss:.4f} "
                f"tok/s {tokens_per_step / dt:,.0f}",
                flush=True,
            )
    if bar is not None:
        bar.close()

    summary = _finish(
        cfg,
        setup,
        model,
        run_dir,
        rank,
        world,
        n_params,
        corpus.describe(),
        timed_tokens / timed_s if timed_s else float("nan"),
        time.perf_counter() - t_start,
    )
    return summary


def _parallel_step(
    cfg: TrainConfig, setup: Setup, parallel: Any, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> float:
    """One step under ``--tp``/``--pp``; returns the global batch's loss (on every rank)."""
    if parallel.schedule is not None:
        with _autocast(device):
            local = parallel.pipeline_step(x, y)
    else:
        with _autocast(device):
            loss = lm_loss(setup.model(x), y)
        loss.backward()
        local = loss.detach()
    if cfg.grad_clip:
        parallel.clip_grad_norm_(setup.model.parameters(), cfg.grad_clip)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return parallel.batch_mean(local, device)


def _finish(
    cfg: TrainConfig,
    setup: Setup,
    model: GPT,
    run_dir: str,
    rank: int,
    world: int,
    n_params: int,
    corpus: dict[str, Any],
    tokens_per_s: float,
    wall_s: float,
) -> dict[str, Any]:
    """g-SNR table, plots and summary.json (rank 0 writes; every rank joins collectives)."""
    from sai_dist.table import format_table, gsnr_table

    # Pipeline stages each hold part of the table: gather the whole model's on every rank.
    whole = setup.parallel is not None and cfg.pp > 1
    table = gsnr_table(model, setup.optimizer, whole_model=whole) if cfg.optimizer == "sgdsai" else None
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl")) if rank == 0 else []
    vals = [r["val_loss"] for r in records if r.get("kind") == "val"]
    summary = {
        "run_dir": run_dir,
        "backend": cfg.backend,
        "world_size": world,
        "optimizer": cfg.optimizer,
        "lr": cfg.learning_rate,
        "steps": cfg.steps,
        "parameters": n_params,
        "corpus": corpus,
        "final_val_loss": vals[-1] if vals else None,
        "tokens_per_s": tokens_per_s,
        "wall_s_this_process": wall_s,
    }
    if rank == 0:
        title = f"{cfg.name}: {cfg.backend} x{world}, {cfg.optimizer} lr {cfg.learning_rate:g}"
        plot_losses(records, os.path.join(run_dir, "loss.png"), title)
        if table is not None:
            with open(os.path.join(run_dir, "gsnr_table.txt"), "w") as f:
                f.write(format_table(table) + "\n")
            with open(os.path.join(run_dir, "gsnr_table.json"), "w") as f:
                json.dump(table, f, indent=2)
            plot_gsnr(table, os.path.join(run_dir, "gsnr.png"), f"{cfg.name}: per-parameter SGD-SaI scale")
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(
            f"[sai-dist train] done: {run_dir} (final val loss {summary['final_val_loss']}, "
            f"{tokens_per_s:,.0f} tokens/s)",
            flush=True,
        )
    return summary
