"""``sai-dist train --tp N --pp M`` (FSDP2 on the rest of the ranks) against the
single-process job, launched as users launch it (tests/support/job_runs.py).

Every configuration trains the same model (``--qkv separate``, 2 blocks) on the same global
batches, so its per-step losses, validation losses and whole-model g-SNR table must be the
single-process job's up to float32 reduction order: TP splits matmuls over ranks, the
pipeline averages micro-batch means, FSDP2 averages over data-parallel ranks, and the
gradient norm is summed over stages. The g-SNR table rank 0 writes covers every stage's
parameters with the single-process names, which shows the normaliser is the whole model's.
Plus resume of a killed ``--tp 2 --pp 2`` run (bit-identical to the uninterrupted one) and
the refusals before start.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.job_runs import finish_job, job, job_env, losses, records, run_ok, spawned, start_job

# Measured on this model (6 steps, CPU float32, every case below; see docs/training.md): per-step
# train and validation losses within 1.8e-7 relative of the single-process job, g-SNR within
# 8.6e-8 relative (rows with signal), scales within 1.9e-6 absolute.
LOSS_RTOL = 1e-6
GSNR_RTOL = 1e-6
SCALE_ATOL = 1e-5
MODEL = ["--qkv", "separate", "--n-layers", "2", "--steps", "6", "--eval-every", "3", "--ckpt-every", "3"]

CASES = {
    "tp2": (["--tp", "2"], 2),
    "pp2": (["--pp", "2"], 2),
    "tp2-pp2": (["--tp", "2", "--pp", "2"], 4),
    "pp2-dp2": (["--pp", "2"], 4),
    "tp2-dp2": (["--tp", "2"], 4),
}


def _table(run: Path) -> dict[str, Any]:
    return json.load(open(run / "gsnr_table.json"))


def _val(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records(run) if r["kind"] == "val"}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("single")
    spawned(root, "single", "--backend", "single", *MODEL)
    return root / "single"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_3d_job_matches_single_process(tmp_path: Path, single: Path, case: str) -> None:
    flags, nproc = CASES[case]
    spawned(tmp_path, case, *MODEL, *flags, "--nproc", str(nproc))
    run = tmp_path / case
    want, got = losses(single), losses(run)
    assert list(got) == list(want)
    loss_err = max(_rel(got[s], want[s]) for s in want)
    val_want, val_got = _val(single), _val(run)
    assert list(val_got) == list(val_want) == [3, 6]
    val_err = max(_rel(val_got[s], val_want[s]) for s in val_want)
    t_want, t_got = _table(single), _table(run)
    assert list(t_got) == list(t_want)  # every stage's parameters, single-process names and order
    assert all(t_got[n]["numel"] == t_want[n]["numel"] for n in t_want)
    # Scales (g-SNR / the whole model's max) absolutely, for every row; g-SNR relatively where
    # it carries signal. Not attn.k.bias: its gradient is exactly zero in exact arithmetic (a
    # key bias adds q.b to every score of a query row, which softmax ignores), so its g-SNR
    # (~6e-4, scale ~1e-5) is that of rounding noise and differs by tens of percent between
    # any two summation orders.
    scale_err = max(abs(t_got[n]["scale"] - t_want[n]["scale"]) for n in t_want)
    signal = [n for n in t_want if t_want[n]["scale"] > 1e-3]
    assert len(signal) == len(t_want) - 2  # the two blocks' attn.k.bias
    gsnr_err = max(_rel(t_got[n]["gsnr"], t_want[n]["gsnr"]) for n in signal)
    print(
        f"{case}: loss rel err {loss_err:.2e}, val {val_err:.2e}, g-SNR {gsnr_err:.2e}, scale {scale_err:.2e}"
    )
    assert loss_err <= LOSS_RTOL and val_err <= LOSS_RTOL
    assert gsnr_err <= GSNR_RTOL and scale_err <= SCALE_ATOL
    assert max(row["scale"] for row in t_got.values()) == pytest.approx(1.0)  # one whole-model max
    assert want[6] < want[1]  # it learns
    meta = json.load(open(run / "checkpoints" / "step_000006" / "meta.json"))
    assert meta["optim_state"] == "flat" and meta["world_size"] == nproc


@pytest.mark.distributed
@pytest.mark.slow
def test_killed_3d_run_resumes_bit_identically(tmp_path: Path) -> None:
    flags = [*MODEL, "--tp", "2", "--pp", "2", "--nproc", "4", "--runs-dir", str(tmp_path)]
    full = spawned(tmp_path, "full", *flags)
    # Rank 3 (last stage) dies after step 4: the checkpoint of step 3 is the latest.
    die = job_env(SAI_DIST_TRAIN_DIE_AFTER_STEP="4", SAI_DIST_TRAIN_DIE_RANK="3")
    code, out = finish_job(start_job(job(*flags, "--name", "killed"), die))
    assert code != 0, out[-2000:]
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "LATEST").read_text().strip() == "step_000003"
    run_ok([sys.executable, "-m", "sai_dist.train", "--resume", str(killed), "--no-progress"])
    assert losses(killed) == full  # every step, bit for bit
    assert _table(killed) == _table(tmp_path / "full")
    events = [json.loads(line) for line in open(killed / "events.jsonl")]
    assert [e.get("gsnr") for e in events if e["event"] == "start"] == ["pending", "loaded"]

    # The same checkpoint resumed as one process (DCP reshards the flat state): the losses
    # continue within the tolerance and g-SNR is the loaded one, unchanged.
    elsewhere = tmp_path / "as_single"
    shutil.copytree(tmp_path / "full", elsewhere)
    ckpt = elsewhere / "checkpoints" / "step_000003"
    back = ["--backend", "single", "--tp", "1", "--pp", "1", "--no-progress"]
    run_ok([sys.executable, "-m", "sai_dist.train", "--resume", str(ckpt), *back])
    single = losses(elsewhere)
    assert single[3] == full[3]  # kept from the 3-D run
    assert max(_rel(single[s], full[s]) for s in (4, 5, 6)) <= LOSS_RTOL
    assert _table(elsewhere) == _table(tmp_path / "full")


# -- refusals before start (in-process: nothing is spawned) ------------------------------------


BAD = [
    (["--tp", "2"], "--tp 2 needs --qkv separate"),
    (["--pp", "2", "--backend", "ddp"], "--tp 1 --pp 2 with --backend ddp"),
    (["--tp", "2", "--backend", "single", "--qkv", "separate"], "use --backend fsdp2"),
    (["--tp", "2", "--qkv", "separate", "--nproc", "3"], "world size 3 is not divisible by --tp 2 x --pp 1"),
    (["--tp", "4", "--qkv", "separate", "--nproc", "4"], "--n-heads 2 is not divisible by --tp 4"),
    (
        ["--tp", "4", "--qkv", "separate", "--n-heads", "2", "--d-model", "30"],
        "--d-model 30 is not divisible",
    ),
    (["--pp", "3", "--n-layers", "2", "--nproc", "3"], "--n-layers 2 is fewer than --pp 3"),
    (
        ["--pp", "2", "--microbatches", "3"],
        "4 rows per data-parallel rank, not divisible by --microbatches 3",
    ),
    (["--tp", "2", "--qkv", "separate", "--nproc", "4", "--global-batch", "3"], "data-parallel degree 2"),
    (["--microbatches", "2"], "--microbatches is for pipeline parallel"),
    (["--qkv", "split"], "--qkv 'split': choose one of fused, separate"),
]


@pytest.mark.parametrize(("flags", "message"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_3d_settings_are_refused_before_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    from sai_dist.train import cli

    runs = tmp_path / "runs"
    argv = [
        "--runs-dir",
        str(runs),
        "--name",
        "x",
        "--global-batch",
        "4",
        "--n-heads",
        "2",
        "--d-model",
        "32",
    ]
    assert cli.main([*argv, "--steps", "1", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not runs.exists()  # nothing started, nothing written


def test_launched_ranks_refuse_a_world_that_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a launcher each rank checks its own world size before joining anything, so every
    rank exits with the same message (no rank waits for a peer)."""
    from sai_dist.train import cli

    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        runs = tmp_path / "runs"
        assert cli.main(["--runs-dir", str(runs), "--tp", "2", "--qkv", "separate", "--no-progress"]) == 2
        assert "world size 3 is not divisible by --tp 2 x --pp 1 = 2" in capsys.readouterr().err
        assert not runs.exists()


def test_resume_with_other_qkv_form_is_refused(tmp_path: Path) -> None:
    """The checkpoint's model signature names the q/k/v parameters: a fused model cannot
    load it (and vice versa), before anything is loaded."""
    from sai_dist.train.config import TrainConfig
    from sai_dist.train.loop import train
    from sai_dist.train.run_checkpoints import CheckpointError

    common: dict[str, Any] = dict(
        runs_dir=str(tmp_path),
        backend="single",
        n_layers=1,
        d_model=32,
        n_heads=2,
        seq_len=32,
        global_batch=4,
        steps=2,
        ckpt_every=1,
        eval_every=2,
        progress=False,
    )
    cfg = TrainConfig(name="sep", qkv="separate", **common)
    cfg.validate()
    train(cfg, None)
    ckpt = tmp_path / "sep" / "checkpoints" / "step_000002"
    other = TrainConfig(name="sep", qkv="fused", **{**common, "steps": 3})
    other.validate()
    with pytest.raises(
        CheckpointError, match=r"different model: parameters not in the checkpoint: \['blocks\.0\.attn\.qkv"
    ):
        train(other, None, str(ckpt))
