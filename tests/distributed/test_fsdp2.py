"""FSDP2 (fully_shard), HSDP and DDP against the single-process SGDSaI run.

One launch per world size tests several things at once (a 4-rank launch on two cores
costs ~10 s of start-up): 4 ranks run FSDP2 (saving a DCP checkpoint after 10 steps), HSDP
2 x 2 and the layout on hand-built DTensors; 3 ranks run FSDP2 with uneven shards; 2 ranks
run FSDP2, a resume from the 4-rank checkpoint, gradient accumulation, bf16 mixed precision
and DDP. The 1-process resume runs here, on plain tensors.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import sai_dist
from sai_dist import checkpoint
from tests.distributed import fsdp2_ranks
from tests.support.compare import PARAM_RTOL, TABLE_RTOL, max_param_error, max_table_error
from tests.support.ranks import run_ranks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ref() -> dict[Any, Any]:
    return fsdp2_ranks.reference()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("dcp") / "step10")


@pytest.fixture(scope="module")
def run4(ckpt_dir: str) -> list[dict[str, Any]]:
    return run_ranks(fsdp2_ranks.launch_4, 4, ckpt_dir, timeout=400)


@pytest.fixture(scope="module")
def run3() -> list[dict[str, Any]]:
    return run_ranks(fsdp2_ranks.launch_3, 3, timeout=300)


@pytest.fixture(scope="module")
def run2(run4: list[dict[str, Any]], ckpt_dir: str) -> list[dict[str, Any]]:
    return run_ranks(fsdp2_ranks.launch_2, 2, ckpt_dir, timeout=400)


def check_against_reference(results: list[dict[str, Any]], key: str, ref: dict[Any, Any]) -> None:
    for rank, res in enumerate(results):
        run = res[key]
        param_err = max_param_error(run["params"], ref[fsdp2_ranks.STEPS])
        table_err = max_table_error(run["table"], ref["table"])
        print(f"{key} world={len(results)} rank={rank}: param rel err {param_err:.2e}, table {table_err:.2e}")
        assert param_err < PARAM_RTOL
        assert table_err < TABLE_RTOL


def check_sharded(results: list[dict[str, Any]], key: str) -> None:
    """Layout, collective counts and per-rank state bytes of a sharded run."""
    for res in results:
        run = res[key]
        assert run["layout"] == "DTensorLayout"
        # Step 1: the cross-rank consistency check (one fixed-size all_reduce) and one
        # batched all_reduce per statistics pass; no other collective, ever.
        assert run["step_counts"][0] == {"dist.all_reduce": 3}
        assert run["step_counts"][1:] == [{}] * (fsdp2_ranks.STEPS - 1)
        assert run["control"] >= 2  # the counter sees DTensor and plain collectives
        state = run["state"]
        assert state["bad"] == []
        # 4 bytes per local shard element (fp32 momentum) + 3 fp32 scalars per tensor.
        assert state["state_bytes"] == 4 * state["local_elements"] + 12 * state["tensors"]
    # The shards partition the parameters (replicas hold a copy each under HSDP).
    total = sum(r[key]["state"]["local_elements"] for r in results)
    numel = sum(p.numel() for p in fsdp2_ranks.make_model().parameters())
    replicas = 2 if key == "hsdp" else 1
    assert total == replicas * numel


def test_fsdp2_4_ranks(run4, ref):
    check_sharded(run4, "fsdp2")
    check_against_reference(run4, "fsdp2", ref)
    # head.weight (3, 12) and temperature (2,) leave rank 3 an empty shard.
    assert run4[3]["fsdp2"]["state"]["local_elements"] < run4[0]["fsdp2"]["state"]["local_elements"]


def test_hsdp_2x2(run4, ref):
    check_sharded(run4, "hsdp")
    check_against_reference(run4, "hsdp", ref)


def test_fsdp2_3_ranks_uneven(run3, ref):
    check_sharded(run3, "fsdp2")
    check_against_reference(run3, "fsdp2", ref)


def test_fsdp2_2_ranks(run2, ref):
    check_sharded(run2, "fsdp2")
    check_against_reference(run2, "fsdp2", ref)


def test_ddp_2_ranks(run2, ref):
    assert run2[0]["ddp"]["layout"] == "ReplicatedLayout"
    check_against_reference(run2, "ddp", ref)


def test_gradient_accumulation(run2, ref):
    check_against_reference(run2, "accumulation", ref)


def test_mixed_precision_bf16(run2, ref):
    for res in run2:
        run = res["mixed"]
        assert run["state"]["param_dtypes"] == ["torch.float32"]
        assert run["state"]["buffer_dtypes"] == ["torch.float32"]
        assert run["state"]["bad"] == []
        param_err = max_param_error(run["params"], ref[fsdp2_ranks.STEPS])
        table_err = max_table_error(run["table"], ref["table"])
        print(f"bf16 mixed precision: param rel err {param_err:.2e}, table {table_err:.2e}")
        # bf16 has 8 significant bits (2**-8 = 3.9e-3): g-SNR from bf16-reduced gradients
        # and 20 steps of bf16 forward/backward stay within a few bf16 ulps.
        assert param_err < 3e-2
        assert table_err < 3e-2


def test_layout_moments_on_mixed_placements(run4):
    for res in run4:
        got = torch.as_tensor(res["layout_moments"]["got"])
        want = torch.as_tensor(res["layout_moments"]["expected"])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The (1, 4) tensor sharded on dim 0 over 2 ranks leaves one of them empty.
    assert sorted(r["layout_moments"]["local_numels"][1] for r in run4) == [0, 0, 4, 4]


def test_dcp_resume_4_to_2(run2, ref):
    for res in run2:
        run = res["resumed"]
        # The loaded scalars are the saved ones, and 10 steps on new data keep them.
        assert max_table_error(run["loaded_table"], ref["table"]) < TABLE_RTOL
        assert run["table"] == run["loaded_table"]
        assert run["state"]["bad"] == []
        param_err = max_param_error(run["params"], ref[fsdp2_ranks.STEPS])
        print(f"DCP 4 -> 2 resume: param rel err {param_err:.2e}")
        assert param_err < PARAM_RTOL


def test_dcp_resume_4_to_1(run4, ckpt_dir, ref):
    """Load the 4-rank FSDP2 checkpoint into a plain single-process model and continue."""
    del run4  # the checkpoint exists once the 4-rank launch has run
    model = fsdp2_ranks.make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.0)  # the load, not the seed, must provide the weights
    opt = fsdp2_ranks.make_optimizer(model)
    assert opt.layout.__class__.__name__ == "ReplicatedLayout"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading emits no warning at all (no probe-step noise)
        checkpoint.load(ckpt_dir, model, opt)
    assert opt.initialized
    loaded = sai_dist.gsnr_table(model, opt)
    assert max_table_error(loaded, ref["table"]) < TABLE_RTOL
    assert max_param_error(fsdp2_ranks.full_params(model), ref[fsdp2_ranks.SAVE_AT]) < PARAM_RTOL
    assert all(isinstance(s["momentum_buffer"], torch.Tensor) for s in opt.state.values())
    fsdp2_ranks.train_steps(model, opt, 0, 1, fsdp2_ranks.SAVE_AT, fsdp2_ranks.STEPS)
    assert sai_dist.gsnr_table(model, opt) == loaded
    param_err = max_param_error(fsdp2_ranks.full_params(model), ref[fsdp2_ranks.STEPS])
    print(f"DCP 4 -> 1 resume: param rel err {param_err:.2e}")
    assert param_err < PARAM_RTOL


def test_dcp_state_before_first_step_loads_nothing(tmp_path, ref):
    """A checkpoint saved before step 1 holds no SGD-SaI state; loading it leaves the
    optimizer uninitialised, and training then equals the plain run."""
    model = fsdp2_ranks.make_model()
    opt = fsdp2_ranks.make_optimizer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.save(str(tmp_path), model, opt)
    model2 = fsdp2_ranks.make_model()
    opt2 = fsdp2_ranks.make_optimizer(model2)
    checkpoint.load(str(tmp_path), model2, opt2)
    assert not opt2.initialized and not opt2.state
    fsdp2_ranks.train_steps(model2, opt2, 0, 1, 0, fsdp2_ranks.SAVE_AT)
    assert max_param_error(fsdp2_ranks.full_params(model2), ref[fsdp2_ranks.SAVE_AT]) < PARAM_RTOL


def test_plain_dcp_template_restores_state(ckpt_dir, run4, ref):
    """DCP's own template for a fresh SGDSaI (built by a zero-gradient, lr-0 probe step) holds
    SGD-SaI's state shapes (sai_dist.probe), so the plain recipe dcp.load +
    set_optimizer_state_dict restores exactly what sai_dist.checkpoint.load does."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    del run4
    model = fsdp2_ranks.make_model()
    opt = fsdp2_ranks.make_optimizer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probe is recognised: no warning
        plain = get_optimizer_state_dict(model, opt)
    assert all(p.grad is None for p in model.parameters())  # the probe left no gradients
    assert not opt.initialized  # placeholders do not fix g-SNR
    ours = checkpoint.optimizer_state_template(model, opt)
    assert set(plain["state"]) == set(ours["state"]) == {n for n, _ in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"optim": plain}, checkpoint_id=ckpt_dir, no_dist=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_optimizer_state_dict(model, opt, plain)
    assert opt.initialized
    model2 = fsdp2_ranks.make_model()
    opt2 = fsdp2_ranks.make_optimizer(model2)
    checkpoint.load(ckpt_dir, model2, opt2)
    assert sai_dist.gsnr_table(model, opt) == sai_dist.gsnr_table(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"], rtol=0, atol=0
        )


def test_refusals_name_the_culprit(run2):
    msgs = run2[0]["refusals"]
    assert "Partial on mesh dim(s) [0]" in msgs["partial"]
    assert "device meshes over different ranks ([0, 1] and [0]" in msgs["meshes"]
    assert "never given" in msgs["stranger"] and "local shape (2, 2)" in msgs["stranger"]
