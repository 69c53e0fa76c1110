"""FSDP1 (torch FullyShardedDataParallel) trained for real on CPU with gloo, against the
single-process SGDSaI: ``use_orig_params`` False and True, FULL_SHARD at 2 and 3 ranks
(uneven shards and padding), SHARD_GRAD_OP and NO_SHARD at 2, HYBRID_SHARD 2 x 2 at 4.
Parameters after 20 steps to 1e-5, ``gsnr_table`` to 1e-6. Plus: the refusal when the
flat-parameter layout is not given, without and with a process group."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

import sai_dist
from sai_dist.layouts import LayoutError
from tests.distributed import fsdp1_ranks, fsdp2_ranks
from tests.support.compare import PARAM_RTOL, TABLE_RTOL, max_param_error, max_table_error
from tests.support.ranks import run_ranks


@pytest.fixture(scope="module")
def ref_groups() -> dict[Any, Any]:
    return fsdp2_ranks.reference()


@pytest.fixture(scope="module")
def ref_single() -> dict[Any, Any]:
    return fsdp1_ranks.reference_single_group()


@pytest.fixture(scope="module")
def run2() -> list[dict[str, Any]]:
    return run_ranks(fsdp1_ranks.launch_2, 2, timeout=400)


@pytest.fixture(scope="module")
def run3() -> list[dict[str, Any]]:
    return run_ranks(fsdp1_ranks.launch_3, 3, timeout=400)


@pytest.fixture(scope="module")
def run4() -> list[dict[str, Any]]:
    return run_ranks(fsdp1_ranks.launch_4, 4, timeout=500)


def check(results: list[dict[str, Any]], key: str, ref: dict[Any, Any], group_size: int | None) -> None:
    numel = sum(p.numel() for p in fsdp2_ranks.make_model().parameters())
    held = 0
    for rank, res in enumerate(results):
        run = res[key]
        assert run["layout"] == "FlatParamLayout"
        assert run["group_size"] == group_size
        param_err = max_param_error(run["params"], ref[fsdp2_ranks.STEPS])
        table_err = max_table_error(run["table"], ref["table"])
        print(f"FSDP1 {key} world={len(results)} rank={rank}: params {param_err:.2e}, table {table_err:.2e}")
        assert param_err < PARAM_RTOL
        assert table_err < TABLE_RTOL
        # Step 1: the cross-rank check (one fixed-size all_reduce over the sharding group,
        # or the world without one) and two batched statistics all_reduces over a sharding
        # group; never again.
        first = {"dist.all_reduce": 3 if group_size else 1}
        assert run["counts"] == [first] + [{}] * (fsdp2_ranks.STEPS - 1)
        held += run["held_elements"]
    # Segments cover each model element exactly once per shard group and never padding.
    copies = len(results) // (group_size or 1)
    assert held == copies * numel


@pytest.mark.distributed
def test_fsdp1_flat_2_ranks(run2, ref_single):
    check(run2, "flat", ref_single, 2)
    # The flat shards carry padding the layout leaves out.
    assert sum(r["flat"]["local_elements"] for r in run2) > sum(r["flat"]["held_elements"] for r in run2)


@pytest.mark.distributed
def test_fsdp1_orig_params_2_ranks(run2, ref_groups):
    check(run2, "orig", ref_groups, 2)


@pytest.mark.distributed
def test_fsdp1_shard_grad_op_2_ranks(run2, ref_groups):
    check(run2, "grad_op", ref_groups, 2)


@pytest.mark.distributed
def test_fsdp1_no_shard_2_ranks(run2, ref_single):
    check(run2, "no_shard", ref_single, None)


@pytest.mark.distributed
def test_fsdp1_flat_3_ranks(run3, ref_single):
    check(run3, "flat", ref_single, 3)


@pytest.mark.distributed
def test_fsdp1_orig_params_3_ranks(run3, ref_groups):
    check(run3, "orig", ref_groups, 3)


@pytest.mark.distributed
def test_fsdp1_hybrid_shard_2x2_orig_params(run4, ref_groups):
    check(run4, "hybrid_orig", ref_groups, 2)


@pytest.mark.distributed
def test_fsdp1_hybrid_shard_2x2_flat(run4, ref_single):
    check(run4, "hybrid_flat", ref_single, 2)


@pytest.mark.distributed
def test_table_keeps_a_users_submodule_called_module_under_every_wrapper(run2):
    """One name policy (sai_dist.names): a user's submodule called ``module`` beside a
    parameter that would collide without it keeps its segment in the g-SNR table under DDP,
    FSDP2 and FSDP1's flat-parameter layout alike, with the single-process values."""
    for res in run2:
        tables = res["module_named"]
        single = tables.pop("single")
        names = ["net.weight", "net.module.weight", "net.module.bias", "head.weight", "head.bias"]
        assert list(single) == names
        for wrapper, table in tables.items():
            assert list(table) == list(single), wrapper
            assert max_table_error(table, single) < TABLE_RTOL, wrapper


@pytest.mark.distributed
def test_fsdp1_own_optim_state_dict_round_trips_or_refuses_by_name(run2):
    """``FSDP.optim_state_dict`` carries SGD-SaI's state with ``use_orig_params=True`` and
    float32 momentum (per original parameter, whole shapes; resumed bit-identically) and
    refuses, on every rank, what it would misread; ``optimizer.state_dict()`` stays."""
    shapes = {n: tuple(p.shape) for n, p in fsdp2_ranks.make_model().named_parameters()}
    reasons = {
        "flat_float32": "use_orig_params=False",
        "orig_int8": "int8 codes with per-block scales",
        "orig_bfloat16": "as torch.bfloat16",
    }
    # The int8 case really has a rank without int8 state, which refuses all the same.
    assert {r["own_state_dict"]["refused"]["orig_int8"]["holds_int8"] for r in run2} == {True, False}
    for r in run2:
        own = r["own_state_dict"]
        assert own["shapes"] == shapes
        for name, want in own["continued"].items():
            assert torch.equal(torch.as_tensor(own["resumed"][name]), torch.as_tensor(want)), name
        assert own["refused"].keys() == reasons.keys()
        for case, reason in reasons.items():
            got = own["refused"][case]
            assert got["unchanged"] and got["direct_states"] > 0, case
            assert len(got["errors"]) == 3, case
            for error in got["errors"]:
                assert error is not None and "FSDP1's optimizer state dict" in error, (case, error)
                assert reason in error and "optimizer.state_dict() on every rank" in error, (case, error)


@pytest.mark.distributed
def test_fsdp1_without_layout_refused(run2):
    msg = run2[0]["refusal"]
    assert "flattened by FSDP1" in msg and "flat_param_layout(model)" in msg


def test_flattened_parameter_refused_without_process_group():
    flat = nn.Parameter(torch.zeros(20))
    _set_fsdp_flattened(flat)
    ok = nn.Parameter(torch.zeros(3))
    with pytest.raises(LayoutError, match=r"flattened by FSDP1.*shape \(20,\).*flat_param_layout\(model\)"):
        sai_dist.SGDSaI([ok, flat])


def test_flattened_parameter_refused_in_added_group():
    opt = sai_dist.SGDSaI([nn.Parameter(torch.zeros(3))])
    flat = nn.Parameter(torch.zeros(8))
    _set_fsdp_flattened(flat)
    with pytest.raises(LayoutError, match="FSDP1"):
        opt.add_param_group({"params": [flat]})
    assert len(opt.param_groups) == 1  # the refused group was not kept
