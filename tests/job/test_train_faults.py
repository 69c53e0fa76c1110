"""Faults, resumes and bad input at the level of the training job (issue 9, job half).

* Bad command lines and config files: refused with the flag or key named, exit status 2,
  before any process group or run folder exists.
* Checkpoints: truncated, corrupted, incomplete or foreign checkpoints are refused naming the
  file or parameter, and the live model and optimizer are left exactly as they were.
* Elastic restart: torchrun ``--max-restarts 1`` with a rank SIGKILLed mid-training (FSDP2,
  DeepSpeed ZeRO-2) or in the middle of a save (FSDP2): the job resumes by itself from its
  newest complete checkpoint and ends with the uninterrupted run's parameters (1e-6) and
  losses, with g-SNR loaded from the checkpoint, never recomputed.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sai_dist.train import run_checkpoints as ckpt_io
from sai_dist.train.backends import build
from sai_dist.train.cli import main
from sai_dist.train.config import TrainConfig
from sai_dist.train.loop import train
from sai_dist.train.model import GPT, GPTConfig
from sai_dist.train.processes import wait_tree
from tests.support.job_runs import BIN, REPO, TINY, job_env, losses, start_job, tiny_train_config
from tests.support.ranks import free_port

# -- bad input: refused before anything starts -------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--momentum", "1.0"], "--momentum"),
        (["--momentum", "-0.1"], "--momentum"),
        (["--weight-decay", "-0.01"], "--weight-decay"),
        (["--dropout", "1"], "--dropout"),
        (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
        (["--grad-clip", "inf"], "--grad-clip"),
        (["--steps", "0"], "--steps"),
        (["--pg-timeout", "0"], "--pg-timeout"),
        (["--pg-timeout", "nan"], "--pg-timeout"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--d-model", "30", "--n-heads", "4"], "--n-heads"),
        (["--backend", "zero"], "--backend"),
        (["--global-batch", "5", "--nproc", "2"], "--global-batch 5 is not divisible by the world size 2"),
        (["--backend", "hsdp", "--nproc", "4", "--hsdp-shard-size", "3"], "--hsdp-shard-size"),
        (["--resume", "auto"], "--resume auto needs --name"),
        (["--resume", "/nonexistent/run"], "no checkpoint there"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_command_line_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    import torch.distributed as dist

    runs = tmp_path / "runs"
    code = main(["--runs-dir", str(runs), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert "sai-dist train: error:" in err and named in err, err
    assert not runs.exists()  # no run folder
    assert not dist.is_initialized()  # no process group


def _tiny_cfg(tmp_path: Path, name: str, **over: object) -> TrainConfig:
    defaults = dict(steps=4, warmup_steps=2, eval_every=4, eval_batches=1, ckpt_every=2)
    return tiny_train_config(tmp_path, name, **{**defaults, **over})


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step single-process SGD-SaI run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("single")
    train(_tiny_cfg(tmp, "run"), None)
    return tmp / "run"


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"lerning_rate": 0.1}, "unknown keys ['lerning_rate']"),
        ({"momentum": "0.9"}, "momentum (--momentum): expected float"),
        ({"momentum": 1.5}, "--momentum must be in [0, 1)"),
    ],
    ids=["unknown-key", "wrong-type", "bad-value"],
)
def test_bad_saved_config_is_refused(
    tmp_path: Path, single_run: Path, capsys: pytest.CaptureFixture[str], edit: dict, named: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    cfg_file = run / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **edit}))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert named in err, err
    if "unknown" in named or "type" in named:
        assert str(cfg_file) in err  # the file is named
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


# -- checkpoints: verified before anything is loaded --------------------------------------


def _live(tmp_path: Path, **over: object) -> tuple[TrainConfig, GPT, object]:
    cfg = _tiny_cfg(tmp_path, "live", **over)
    torch.manual_seed(123)  # other weights than the checkpoint's
    model = GPT(GPTConfig(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.seq_len))
    setup = build(cfg, model, torch.device("cpu"), 1)
    return cfg, model, setup


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _assert_unchanged(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, snap: tuple[dict, dict]
) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[0][k]), f"model {k} was modified"
    osd = optimizer.state_dict()
    assert osd["state"] == {} and snap[1]["state"] == {}, "optimizer state was modified"
    assert osd["param_groups"] == snap[1]["param_groups"]


def _load(ckpt: Path, cfg: TrainConfig, model: GPT, setup: object) -> dict:
    expect = {"optimizer": cfg.optimizer, "model": ckpt_io.model_signature(model)}
    return ckpt_io.load(str(ckpt), setup.model, setup.optimizer, setup.engine, expect)  # type: ignore[attr-defined]


def test_intact_checkpoint_loads_with_gsnr(tmp_path: Path, single_run: Path) -> None:
    cfg, model, setup = _live(tmp_path)
    assert ckpt_io.resolve(str(single_run)).endswith("step_000004")
    manifest = json.loads((single_run / "checkpoints" / "step_000004" / "manifest.json").read_text())
    assert {"meta.json", ".metadata", "rng/rank0.pt"} <= set(manifest["files"])
    meta = _load(single_run / "checkpoints" / "step_000004", cfg, model, setup)
    assert meta["step"] == 4
    assert setup.optimizer.initialized  # type: ignore[attr-defined]  # g-SNR came from the file
    table = json.loads((single_run / "gsnr_table.json").read_text())
    from sai_dist.table import gsnr_table

    loaded = gsnr_table(model, setup.optimizer)  # type: ignore[attr-defined]
    assert {k: v["gsnr"] for k, v in loaded.items()} == {k: v["gsnr"] for k, v in table.items()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def _first_distcp(ckpt: Path) -> str:
    return sorted(p.name for p in ckpt.glob("*.distcp"))[0]


@pytest.mark.parametrize(
    ("damage", "target", "says"),
    [
        (_truncate, "distcp", "truncated"),
        (_flip, "distcp", "SHA-256"),
        (_flip, ".metadata", "SHA-256"),
        (_truncate, "rng/rank0.pt", "truncated"),
        (_flip, "meta.json", "SHA-256"),
        (Path.unlink, "distcp", "missing"),
        (_truncate, "manifest.json", "corrupted checkpoint manifest"),
        (Path.unlink, "manifest.json", "missing"),
    ],
    ids=[
        "truncated-distcp",
        "flipped-distcp",
        "flipped-metadata",
        "truncated-rng",
        "flipped-meta",
        "deleted-distcp",
        "truncated-manifest",
        "deleted-manifest",
    ],
)
def test_damaged_checkpoint_is_refused_naming_the_file(
    tmp_path: Path, single_run: Path, damage, target: str, says: str
) -> None:
    ckpt = tmp_path / "step_000004"
    shutil.copytree(single_run / "checkpoints" / "step_000004", ckpt)
    name = _first_distcp(ckpt) if target == "distcp" else target
    damage(ckpt / name)
    cfg, model, setup = _live(tmp_path)
    snap = _snapshot(model, setup.optimizer)  # type: ignore[attr-defined]
    with pytest.raises(ckpt_io.CheckpointError) as info:
        _load(ckpt, cfg, model, setup)
    message = str(info.value)
    assert str(ckpt / name) in message and says in message, message
    _assert_unchanged(model, setup.optimizer, snap)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("over", "says"),
    [
        (
            {"d_model": 48},
            "tok_emb.weight has shape (256, 32) (float32) in the checkpoint, (256, 48) (float32) here",
        ),
        ({"n_layers": 2}, "parameters not in the checkpoint: ['blocks.1."),
        ({"optimizer": "adamw"}, "holds sgdsai optimizer state; this run uses --optimizer adamw"),
    ],
    ids=["wider", "deeper", "other-optimizer"],
)
def test_checkpoint_of_another_model_is_refused(
    tmp_path: Path, single_run: Path, over: dict, says: str
) -> None:
    cfg, model, setup = _live(tmp_path, **over)
    snap = _snapshot(model, setup.optimizer)  # type: ignore[attr-defined]
    with pytest.raises(ckpt_io.CheckpointError, match=r"different model|optimizer state") as info:
        _load(single_run / "checkpoints" / "step_000004", cfg, model, setup)
    assert says in str(info.value), str(info.value)
    _assert_unchanged(model, setup.optimizer, snap)  # type: ignore[attr-defined]


def test_resume_skips_partial_and_falls_back_from_a_broken_pointer(tmp_path: Path, single_run: Path) -> None:
    """What a kill leaves: a ``.partial`` folder (never read), or a LATEST naming a folder
    moved aside by a re-save (the newest complete one is used instead)."""
    root = tmp_path / "checkpoints"
    shutil.copytree(single_run / "checkpoints", root)
    (root / "step_000006.partial").mkdir()
    (root / "step_000006.partial" / "__0_0.distcp").write_bytes(b"half")
    assert ckpt_io.latest(str(root)) == str(root / "step_000004")
    shutil.move(root / "step_000004", root / "step_000004.old123")
    assert (root / "LATEST").read_text().strip() == "step_000004"
    assert ckpt_io.latest(str(root)) == str(root / "step_000002")


# -- elastic restart under torchrun -------------------------------------------------------

ELASTIC = [*TINY, "--steps", "12", "--ckpt-every", "4", "--eval-every", "4"]


def torchrun(tmp_path: Path, name: str, *args: str, **env: str) -> str:
    """torchrun --max-restarts 1 on a c10d rendezvous at 127.0.0.1:<free port>: the job as a
    user starts it for automatic restarts (`--resume auto --name`)."""
    cmd = [
        str(BIN / "torchrun"),
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "-m",
        "sai_dist.train",
        *ELASTIC,
        *args,
        "--runs-dir",
        str(tmp_path),
        "--name",
        name,
        "--resume",
        "auto",
    ]
    code, out = wait_tree(start_job(cmd, job_env(**env)), timeout=240)
    assert code == 0, f"exit {code}:\n{out[-4000:]}"
    return out


def final_params(run: Path) -> dict[str, torch.Tensor]:
    """The model parameters in the run's final checkpoint (step 12), whatever the format."""
    ckpt = run / "checkpoints" / "step_000012"
    engine = ckpt / "engine" / "mp_rank_00_model_states.pt"
    if engine.is_file():
        return torch.load(engine, map_location="cpu", weights_only=False)["module"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run / "final.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)["model"]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "events.jsonl")]


def assert_resumed_like_uninterrupted(run: Path, ref: Path, resumed_from: str) -> float:
    """Final parameters within 1e-6, every step's loss identical, g-SNR loaded once computed;
    returns the largest parameter difference."""
    a, b = final_params(run), final_params(ref)
    assert a.keys() == b.keys() and len(a) > 0
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    assert losses(run) == losses(ref)
    assert sorted(losses(run)) == list(range(1, 13))
    first, computed, restarted = events(run)
    assert (first["attempt"], first["gsnr"], computed["event"], computed["step"]) == (
        0,
        "pending",
        "gsnr_computed",
        1,
    )
    # The restarted attempt found g-SNR in the optimizer before its first step (the
    # optimizer fixes it only when none is there), the very value attempt 0 computed, and
    # logged no computation of its own.
    assert (restarted["attempt"], restarted["resumed_from"], restarted["gsnr"]) == (1, resumed_from, "loaded")
    assert restarted["gsnr_max"] == computed["gsnr_max"] and math.isfinite(computed["gsnr_max"])
    assert json.loads((run / "gsnr_table.json").read_text()) == json.loads(
        (ref / "gsnr_table.json").read_text()
    )
    assert not list((run / "checkpoints").glob("*.partial"))
    return diff


@pytest.fixture(scope="module")
def fsdp2_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp2ref")
    torchrun(tmp, "ref", "--backend", "fsdp2")
    assert [e["attempt"] for e in events(tmp / "ref") if e["event"] == "start"] == [0]
    return tmp / "ref"


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("fault", "resumed_from"),
    [
        # Rank 1 dies after step 6: steps 5-6 are lost and redone from step 4.
        ({"SAI_DIST_TRAIN_DIE_AFTER_STEP": "6"}, "step_000004"),
        # Rank 1 dies inside the save of step 8, its shard written, nothing else: the
        # partial folder is ignored and step 4 is the newest complete checkpoint.
        ({"SAI_DIST_TRAIN_DIE_IN_SAVE": "8"}, "step_000004"),
    ],
    ids=["kill-mid-training", "kill-mid-save"],
)
def test_fsdp2_elastic_restart_resumes_by_itself(
    tmp_path: Path, fsdp2_reference: Path, fault: dict[str, str], resumed_from: str
) -> None:
    out = torchrun(tmp_path, "run", "--backend", "fsdp2", SAI_DIST_TRAIN_DIE_RANK="1", **fault)
    assert "fault injection: SIGKILL" in out
    diff = assert_resumed_like_uninterrupted(tmp_path / "run", fsdp2_reference, resumed_from)
    print(f"max |param - uninterrupted| = {diff:.3g}")


@pytest.mark.distributed
def test_deepspeed_zero2_elastic_restart_resumes_by_itself(tmp_path: Path) -> None:
    pytest.importorskip("sai_dist.deepspeed", reason="sai_dist.deepspeed not on this branch")
    args = ("--backend", "deepspeed", "--deepspeed-config", str(REPO / "configs" / "ds_zero2.json"))
    torchrun(tmp_path, "ref", *args)
    out = torchrun(tmp_path, "run", *args, SAI_DIST_TRAIN_DIE_AFTER_STEP="6", SAI_DIST_TRAIN_DIE_RANK="1")
    assert "fault injection: SIGKILL after step 6" in out
    diff = assert_resumed_like_uninterrupted(tmp_path / "run", tmp_path / "ref", "step_000004")
    print(f"max |param - uninterrupted| = {diff:.3g}")


def test_fault_hooks_fire_only_in_the_first_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    from sai_dist.train import faults

    monkeypatch.setenv("SAI_DIST_TRAIN_DIE_AFTER_STEP", "3")
    monkeypatch.setenv("SAI_DIST_TRAIN_DIE_RANK", "0")
    assert faults._armed("SAI_DIST_TRAIN_DIE_AFTER_STEP", 3)
    assert not faults._armed("SAI_DIST_TRAIN_DIE_AFTER_STEP", 4)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not faults._armed("SAI_DIST_TRAIN_DIE_AFTER_STEP", 3)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
