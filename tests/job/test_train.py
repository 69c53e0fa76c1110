"""Unit tests of the training job's parts: launcher detection, data order, schedule, and
the single-process job against an independent reference loop."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from sai_dist import SGDSaI
from sai_dist.train.backends import lr_at
from sai_dist.train.config import TrainConfig
from sai_dist.train.data import load_corpus, train_batch, val_batches
from sai_dist.train.distributed import detect, first_slurm_host
from sai_dist.train.model import GPT, GPTConfig, lm_loss
from tests.support.job_runs import TINY_CONFIG, tiny_train_config


def test_detect_plain_process_is_single() -> None:
    assert detect({}) is None
    # An sbatch script's own shell has SLURM_PROCID but is not a job step.
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}) is None


def test_detect_torchrun() -> None:
    env = detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0",
            "MASTER_PORT": "1234",
            "TORCHELASTIC_RUN_ID": "x",
        }
    )
    assert env is not None
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node0", 1234, "torchelastic")


def test_detect_slurm_step() -> None:
    env = detect(
        {
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_STEP_NODELIST": "gpu[07-10]",
            "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert env is not None
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 2)
    assert env.master_addr == "gpu07"
    assert env.master_port == 20000 + 123456 % 20000
    assert env.launcher == "slurm"


def test_detect_mpi_with_address() -> None:
    env = detect(
        {
            "PMI_RANK": "1",
            "PMI_SIZE": "2",
            "MPI_LOCALRANKID": "1",
            "MPI_LOCALNRANKS": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "4000",
        }
    )
    assert env is not None
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        1,
        2,
        1,
        "10.0.0.1",
        4000,
    )
    env = detect(
        {
            "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "1",
        }
    )
    assert env is not None and (env.world_size, env.local_world_size, env.launcher) == (4, 2, "mpi")


def test_detect_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="RANK"):
        detect({"RANK": "zero", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node1", "node1"),
        ("gpu[07-10]", "gpu07"),
        ("gpu[3,5-6],cpu1", "gpu3"),
        ("a1,b2", "a1"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_corpus_split_and_batches_are_deterministic() -> None:
    corpus = load_corpus()
    assert corpus.train.numel() > 1_000_000 and corpus.val.numel() > 50_000
    assert corpus.train.numel() + corpus.val.numel() <= (4 << 20) + 2 * corpus.n_files
    x1, y1 = train_batch(corpus, 0, 17, 8, 32, 0, 1)
    x2, _ = train_batch(corpus, 0, 17, 8, 32, 0, 1)
    assert torch.equal(x1, x2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next byte
    assert not torch.equal(x1, train_batch(corpus, 0, 18, 8, 32, 0, 1)[0])
    assert not torch.equal(x1, train_batch(corpus, 1, 17, 8, 32, 0, 1)[0])
    # The global batch does not depend on the world size: ranks take consecutive rows.
    parts = [train_batch(corpus, 0, 17, 8, 32, r, 4)[0] for r in range(4)]
    assert torch.equal(torch.cat(parts), x1)
    v = val_batches(corpus, 0, 2, 8, 32, 0, 1)
    assert len(v) == 2 and v[0][0].shape == (8, 32)


def test_corpus_errors_name_the_cause(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \*\.py files"):
        load_corpus(str(tmp_path))
    (tmp_path / "a.py").write_text("x = 1\n" * 100)
    with pytest.raises(ValueError, match="validation"):
        load_corpus(str(tmp_path))


def test_lr_schedule() -> None:
    cfg = TrainConfig(optimizer="adamw", lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cfg, 110) == pytest.approx(0.1)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="--backend 'zero'"):
        TrainConfig(backend="zero").validate()
    with pytest.raises(ValueError, match="--deepspeed-config"):
        TrainConfig(backend="deepspeed").validate()
    with pytest.raises(ValueError, match="--steps"):
        TrainConfig(steps=0).validate()
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_heads=4)


def _reference_losses(steps: int, lr: float, clip: float) -> list[float]:
    """An independent plain loop: same model init, batches and schedule, written out."""
    corpus = load_corpus()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, seq_len=32))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = SGDSaI([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    losses = []
    warmup = 3
    for s in range(steps):
        peak_frac = (
            (s + 1) / warmup
            if s < warmup
            else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        )
        for g in opt.param_groups:
            g["lr"] = lr * peak_frac
        x, y = train_batch(corpus, 0, s, 4, 32, 0, 1)
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_single_process_job_matches_reference_loop(tmp_path) -> None:
    from sai_dist.train.loop import train

    cfg = tiny_train_config(tmp_path, "ref", steps=8, warmup_steps=3, eval_every=4, ckpt_every=4, lr=0.5)
    summary = train(cfg, None)
    run = tmp_path / "ref"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    torch.testing.assert_close(losses, _reference_losses(8, 0.5, 1.0), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0] - 0.1
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "gsnr_table.txt",
        "gsnr_table.json",
        "loss.png",
        "gsnr.png",
        "checkpoints/LATEST",
        "checkpoints/step_000008/meta.json",
    ):
        assert os.path.isfile(run / name), name
    table = json.load(open(run / "gsnr_table.json"))
    assert "blocks.0.attn.qkv.weight" in table and len(table) == sum(
        1
        for _ in GPT(
            GPTConfig(**{k: TINY_CONFIG[k] for k in ("n_layers", "d_model", "n_heads", "seq_len")})
        ).parameters()
    )
    assert max(row["scale"] for row in table.values()) == pytest.approx(1.0)
    assert summary["final_val_loss"] == [r for r in records if r["kind"] == "val"][-1]["val_loss"]


def test_missing_job_extra_is_named_before_anything_starts(tmp_path, monkeypatch, capsys) -> None:
    """The optimizer needs only torch; the job's progress bar needs tqdm: without it the job
    stops with the install command, before any run folder exists."""
    import importlib.util

    from sai_dist.train import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda n, *a: None if n == "tqdm" else real(n, *a))
    runs = tmp_path / "runs"
    assert cli.main(["--backend", "single", "--runs-dir", str(runs), "--name", "x", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs tqdm" in err and "pip install 'sai_dist[job]'" in err, err
    assert not runs.exists()
    # --no-progress needs no tqdm: the check passes (matplotlib is installed here).
    cfg = cli.TrainConfig(progress=False)
    cli.check_job_extras(cfg)
