"""DeepSpeed ZeRO 0/1/2/3 (+ offload) with ``"type": "SGDSaI"``: 2 gloo ranks on CPU,
checked against single-process SGDSaI on the same global batches.

Each launch runs several engines in turn (DeepSpeed start-up dominates wall time).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sai_dist import SGDSaI, gsnr_table
from tests.distributed import ds_ranks
from tests.support.paths import REPO
from tests.support.ranks import free_port, run_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]

ROOT = REPO
FP32_GSNR_RTOL = 1e-6
FP32_PARAM_RTOL = 1e-5
# bf16 weights carry 8 mantissa bits (relative spacing 2^-8 = 3.9e-3); after 10 steps
# against an fp32 reference 2e-2 (relative to each tensor's largest element) holds.
BF16_PARAM_RTOL = 2e-2
BF16_GSNR_RTOL = 1e-2


def reference(
    steps: int, gas: int = 1, clip: float | None = None, grouped: bool = True, lr: float = 0.05
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Single-process SGDSaI on the whole global batch of every step."""
    torch.set_num_threads(1)
    model = ds_ranks.make_model()
    params = ds_ranks.param_groups(model, lr) if grouped else model.parameters()
    opt = SGDSaI(params, lr=lr, momentum=0.9, weight_decay=0.01, eps=1e-8)
    table: dict[str, Any] = {}
    for step in range(steps):
        x, y = ds_ranks.batch(step, ds_ranks.global_rows(gas))
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if step == 0:
            table = gsnr_table(model, opt)
    return table, {n: p.detach().clone() for n, p in model.named_parameters()}


def param_error(got: dict[str, Any], want: dict[str, torch.Tensor]) -> float:
    """Largest |got - want| relative to each tensor's largest |want|."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    return max(float((torch.as_tensor(got[n]) - want[n]).abs().max() / want[n].abs().max()) for n in want)


def gsnr_error(got: dict[str, Any], want: dict[str, Any]) -> float:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for n in want:
        assert got[n]["numel"] == want[n]["numel"], n
    # The scale carries the normaliser (max g-SNR over ALL blocks of the model).
    return max(max(abs(got[n][k] - want[n][k]) / want[n][k] for k in ("gsnr", "scale")) for n in want)


def check_cases(results: list[list[dict[str, Any]]], cases: list[dict[str, Any]]) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    for case_i, case in enumerate(cases):
        over = case.get("over", {})
        want_table, want_params = reference(case.get("steps", 10), over.get("gas", 1), over.get("clip"))
        bf16 = bool(over.get("bf16"))
        for rank_results in results:
            got = rank_results[case_i]
            assert got["name"] == case["name"]
            assert got["wrapper"] == case["wrapper"], (case["name"], got["wrapper"])
            # Same table on every rank, whichever handle the user passes.
            assert got["table"] == results[0][case_i]["table"], case["name"]
            assert got["table_opt"] == got["table"], case["name"]
            assert got["init_untouched"], case["name"]
            g_err = gsnr_error(got["table"], want_table)
            p_err = param_error(got["params"], want_params)
            assert g_err <= (BF16_GSNR_RTOL if bf16 else FP32_GSNR_RTOL), (case["name"], g_err)
            assert p_err <= (BF16_PARAM_RTOL if bf16 else FP32_PARAM_RTOL), (case["name"], p_err)
            if got["flat_numel"]:
                # One fp32 momentum buffer per flat partition: 4 bytes per element.
                assert got["state_bytes"] == 4 * got["flat_numel"], case["name"]
            measured[case["name"]] = (g_err, p_err, got["t_init"], got["t_train"])
    return measured


STAGES = [
    {"name": "zero0", "stage": 0, "wrapper": "SGDSaI"},
    {"name": "zero1", "stage": 1, "wrapper": "DeepSpeedZeroOptimizer"},
    {"name": "zero2", "stage": 2, "wrapper": "DeepSpeedZeroOptimizer"},
    {"name": "zero3", "stage": 3, "wrapper": "DeepSpeedZeroOptimizer_Stage3"},
    {
        "name": "zero3_offload",
        "stage": 3,
        "over": {"offload": True},
        "wrapper": "DeepSpeedZeroOptimizer_Stage3",
    },
    {"name": "zero2_offload", "stage": 2, "over": {"offload": True}, "wrapper": "DeepSpeedZeroOptimizer"},
    {"name": "zero0_bf16", "stage": 0, "over": {"bf16": True}, "wrapper": "FP16_UnfusedOptimizer"},
    {"name": "zero1_bf16", "stage": 1, "over": {"bf16": True}, "wrapper": "DeepSpeedZeroOptimizer"},
    {
        "name": "zero1_bf16_fp32acc",
        "stage": 1,
        "over": {"bf16": True, "fp32_accum": True},
        "wrapper": "BF16_Optimizer",
    },
    {"name": "zero2_bf16", "stage": 2, "over": {"bf16": True}, "wrapper": "DeepSpeedZeroOptimizer"},
    {"name": "zero3_bf16", "stage": 3, "over": {"bf16": True}, "wrapper": "DeepSpeedZeroOptimizer_Stage3"},
]

FEATURES = [
    {"name": "zero1_clip", "stage": 1, "over": {"clip": 0.5}, "wrapper": "DeepSpeedZeroOptimizer"},
    {"name": "zero3_clip", "stage": 3, "over": {"clip": 0.5}, "wrapper": "DeepSpeedZeroOptimizer_Stage3"},
    {"name": "zero2_gas2", "stage": 2, "over": {"gas": 2}, "wrapper": "DeepSpeedZeroOptimizer"},
    {"name": "zero3_gas2", "stage": 3, "over": {"gas": 2}, "wrapper": "DeepSpeedZeroOptimizer_Stage3"},
    {
        "name": "zero2_round_robin",
        "stage": 2,
        "over": {"round_robin": True},
        "wrapper": "DeepSpeedZeroOptimizer",
    },
    {
        "name": "zero3_3subgroups",
        "stage": 3,
        "over": {"sub_group_size": 20},
        "wrapper": "DeepSpeedZeroOptimizer_Stage3",
    },
    {
        "name": "zero3_offload_clip_gas2",
        "stage": 3,
        "over": {"offload": True, "clip": 0.5, "gas": 2, "sub_group_size": 20},
        "wrapper": "DeepSpeedZeroOptimizer_Stage3",
    },
    {"name": "zero2_json", "stage": 2, "route": "json", "wrapper": "DeepSpeedZeroOptimizer"},
    {
        "name": "zero2_offload_client_optimizer",
        "stage": 2,
        "route": "client",
        "over": {"offload": True},
        "wrapper": "DeepSpeedZeroOptimizer",
    },
    {
        "name": "zero3_plain_deepspeed_initialize",
        "stage": 3,
        "route": "plain",
        "wrapper": "DeepSpeedZeroOptimizer_Stage3",
    },
]


def test_stages_match_single_process(tmp_path):
    results = run_ranks(ds_ranks.run_cases, 2, STAGES, str(tmp_path), timeout=500)
    measured = check_cases(results, STAGES)
    print("\n(g-SNR/scale rel err, param rel err, init s, 10 steps s)", measured)


def test_features_match_single_process(tmp_path):
    results = run_ranks(ds_ranks.run_cases, 2, FEATURES, str(tmp_path), timeout=500)
    measured = check_cases(results, FEATURES)
    by_name = {c["name"]: r for c, r in zip(FEATURES, results[0], strict=True)}
    # The settings really do what the names say.
    rr = by_name["zero2_round_robin"]["info"]
    assert rr["rr_order"] != rr["bit16_order"], "round robin did not reorder the flat group"
    assert by_name["zero3_3subgroups"]["info"]["sub_groups"] == 3
    assert by_name["zero3_offload_clip_gas2"]["info"]["sub_groups"] == 3
    print("\n(g-SNR/scale rel err, param rel err, init s, 10 steps s)", measured)


def test_checkpoints_same_and_other_world_size(tmp_path):
    want_table, want_params = reference(10)
    for stage in (0, 2, 3):
        ranks = run_ranks(ds_ranks.checkpoint_roundtrip, 2, stage, str(tmp_path), {}, timeout=400)
        for r in ranks:
            # Save at 2 -> load at 2 continues identically, g-SNR kept (not recomputed).
            assert r["table_b"] == r["table_a"]
            assert gsnr_error(r["table_a"], want_table) <= FP32_GSNR_RTOL
            for n in r["params_a"]:
                assert (r["params_a"][n] == r["params_b"][n]).all(), (stage, n)
            assert param_error(r["params_a"], want_params) <= FP32_PARAM_RTOL
        # Save at 2 -> load at 1 through the world-size-free checkpoint.
        [one] = run_ranks(ds_ranks.converter_load, 1, stage, str(tmp_path), {}, timeout=300)
        assert one["table"] == ranks[0]["table_a"]
        assert (
            param_error(one["params"], {n: torch.as_tensor(v) for n, v in ranks[0]["params_a"].items()})
            <= 1e-6
        )
        assert param_error(one["params"], want_params) <= FP32_PARAM_RTOL


def test_converter_to_other_stage(tmp_path):
    """A ZeRO-3 checkpoint written at 2 ranks continues under ZeRO-1 at 1 rank."""
    _, want_params = reference(10)
    ranks = run_ranks(ds_ranks.checkpoint_roundtrip, 2, 3, str(tmp_path), {}, timeout=400)
    shutil.copy(tmp_path / "sai_z3.pt", tmp_path / "sai_z1.pt")
    [one] = run_ranks(ds_ranks.converter_load, 1, 1, str(tmp_path), {}, timeout=300)
    assert one["table"] == ranks[0]["table_a"]
    assert param_error(one["params"], want_params) <= FP32_PARAM_RTOL


def test_shipped_configs():
    """configs/ds_zero{1,2,3}.json and ds_zero3_offload.json as shipped (lr 1e-2, clipping
    at 1.0, one param group) match single-process SGDSaI."""
    names = ("zero1", "zero2", "zero3", "zero3_offload")
    paths = [str(ROOT / "configs" / f"ds_{n}.json") for n in names]
    for path in paths:
        cfg = json.loads(Path(path).read_text())
        assert cfg["optimizer"]["type"] == "SGDSaI"
    want_table, want_params = reference(5, clip=1.0, grouped=False, lr=0.01)
    results = run_ranks(ds_ranks.shipped_configs, 2, paths, 5, timeout=400)
    for rank_results in results:
        for got in rank_results:
            assert gsnr_error(got["table"], want_table) <= FP32_GSNR_RTOL, got["path"]
            assert param_error(got["params"], want_params) <= FP32_PARAM_RTOL, got["path"]
    wrappers = [r["wrapper"] for r in results[0]]
    assert wrappers == ["DeepSpeedZeroOptimizer"] * 2 + ["DeepSpeedZeroOptimizer_Stage3"] * 2


@pytest.mark.parametrize("stage", [1, 2])
def test_unattached_sgdsai_refuses_flat_partitions(stage):
    """Without the integration, ZeRO hands SGD-SaI flat partitions: it must raise at
    step 1, touch nothing and fix no g-SNR."""
    from tests.distributed import ds_unhooked_ranks

    results = run_ranks(ds_unhooked_ranks.plain_client_optimizer, 2, stage, timeout=300)
    for r in results:
        assert r["error"] is not None and "never given" in r["error"], r
        assert "sai_dist.deepspeed" in r["error"]
        assert r["unchanged"]
        assert r["gsnr_states"] == 0


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec (mpich) is not installed")
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed")
def test_mpiexec_two_ranks_train(tmp_path):
    """launch/ds_train.py under ``mpiexec -n 2`` (DeepSpeed discovers ranks via mpi4py)."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=str(ROOT),
        TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
        OMP_NUM_THREADS="1",
    )
    out = tmp_path / "metrics.json"
    cmd = [
        "mpiexec",
        "-n",
        "2",
        sys.executable,
        str(ROOT / "launch" / "ds_train.py"),
        "--config",
        str(ROOT / "configs" / "ds_zero2.json"),
        "--steps",
        "60",
        "--lr",
        "0.3",
        "--cpu",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    metrics = json.loads(out.read_text())
    assert metrics["world_size"] == 2
    tail = metrics["losses"][-5:]
    assert sum(tail) / len(tail) < 0.5 * metrics["losses"][0], metrics["losses"]
    assert metrics["gsnr_params"] == metrics["num_params"]
