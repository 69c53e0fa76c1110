"""Measured validation of ``sai-dist memory --tp/--pp`` (sai_dist.memory.parallel): every
rank of a real (pp, dp, tp) layout on gloo holds exactly the bytes of parameters, gradients
and SGD-SaI state (momentum + int8 scales) that the accounting predicts for its stage and
data-parallel rank, for float32, bfloat16 and int8 momentum; where SGDSaI refuses a
momentum dtype (bf16/int8 on row-parallel weights) the accounting refuses too,
naming a tensor of the shape the optimizer names."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sai_dist.memory.models import ModelSpec, param_shapes
from sai_dist.memory.parallel import parallel_memory, stage_params
from tests.distributed import memory_parallel_ranks
from tests.support.ranks import run_ranks

DTYPES = ["float32", "bfloat16", "int8"]


def _spec() -> ModelSpec:
    with torch.device("meta"):
        module = memory_parallel_ranks.build()
    return ModelSpec("memory_parallel_ranks.Decoder", module, None, param_shapes(module))


def _held(st) -> int:
    """Parameter storage + local gradients + SGD-SaI state, as the ranks measure them."""
    return st.memory.params + 4 * st.local_elements + st.memory.state["sgd_sai"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "pp,dp,tp,refused",
    [
        (1, 1, 2, {"bfloat16"}),  # TP only: row-parallel o/down are Shard(1), small enough for int8
        (2, 2, 1, set()),  # PP x FSDP2: every tensor dim-0 sharded once
        (2, 1, 2, {"bfloat16"}),  # TP x PP
        (1, 2, 2, {"bfloat16"}),  # FSDP2 x TP: qkv is (_StridedShard(0), Shard(0)), contiguous
    ],
    ids=["tp2", "pp2xdp2", "tp2xpp2", "dp2xtp2"],
)
def test_every_rank_holds_the_predicted_bytes(pp, dp, tp, refused):
    world = pp * dp * tp
    spec = _spec()
    results = run_ranks(memory_parallel_ranks.run, world, pp, dp, tp, DTYPES, timeout=300)
    for md in DTYPES:
        if md in refused:
            with pytest.raises(ValueError, match="SGDSaI refuses low-precision momentum") as info:
                parallel_memory(spec, world, tp, pp, momentum_dtype=md)
            shape = re.search(r" (\(\d+, \d+\)) is ", str(info.value)).group(1)
            for r in results:
                msg = r["dtypes"][md].get("refused", "")
                assert f"momentum_dtype='{md}' is not supported" in msg, (r["coord"], msg)
                assert f"global shape {shape}" in msg, (shape, msg)
            continue
        by_stage = {}
        for r in results:
            got = r["dtypes"][md]
            assert "refused" not in got, (r["coord"], got["refused"])
            pm = parallel_memory(spec, world, tp, pp, momentum_dtype=md, dp_rank=r["coord"]["dp"])
            st = pm.stages[r["coord"]["pp"]]
            where = (md, r["coord"])
            assert got["state"] == st.memory.state["sgd_sai"], where
            assert got["params_local"] == 4 * st.local_elements, where
            assert got["grads_local"] == 4 * st.local_elements, where
            assert got["params_padded"] == st.memory.params == 4 * st.padded_elements, where
            if r["coord"]["dp"] == 0:
                by_stage[r["coord"]["pp"]] = got["params_padded"] + got["grads_local"] + got["state"]
        pm = parallel_memory(spec, world, tp, pp, momentum_dtype=md)
        busiest = max(by_stage, key=lambda s: (by_stage[s], -s))
        assert busiest == pm.busiest.stage and by_stage[busiest] == _held(pm.busiest), (md, by_stage)
        if md == "int8":  # blocks and the small-tensor rule (original size) both occur on every rank
            stages = stage_params(spec.module, pp)
            for r in results:
                names = stages[r["coord"]["pp"]]
                big = sum(1 for _, s in names if math.prod(s) >= 4096)
                assert 0 < r["dtypes"][md]["int8_tensors"] == big < len(names), r["coord"]
