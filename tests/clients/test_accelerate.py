"""accelerate 1.15: SGDSaI built before ``prepare(model, optimizer)``, compared with
single-process SGDSaI on the same batches (tiny LlamaForCausalLM, 2 ranks, 4 steps).

FSDP2 is accelerate's own path (its parameter swap included) driven on CPU; the real-GPU
run is the ``gpu`` test. The accelerate-free reproduction of the rebinding comes first.
"""

from __future__ import annotations

import pytest
import torch

from tests.clients.launch import torchrun
from tests.support.ranks import run_ranks

pytest.importorskip("accelerate", reason="accelerate is not installed: pip install -e '.[clients]'")
pytestmark = pytest.mark.distributed

# fp32, 4 steps, 2 ranks: gradients are averaged in another order than one process sums them.
PARAM_RTOL = 1e-6
TABLE_RTOL = 1e-6


def test_rebinding_to_fsdp2_parameters_before_step_1():
    from tests.clients import rebind_ranks

    results = run_ranks(rebind_ranks.rebind_after_fully_shard, 2, timeout=240)
    for r in results:
        assert r["layout"] == "DTensorLayout"
        assert r["param_rel_err"] < PARAM_RTOL and r["table_rel_err"] < TABLE_RTOL, r
        assert "never given" in r["late_rebind"] and "after g-SNR was fixed" in r["late_rebind"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_accelerate_equals_single_process(mode, tmp_path):
    r = torchrun("accelerate_ranks.py", tmp_path / "out.json", mode, timeout=240)
    assert r["layout"] == ("DTensorLayout" if mode == "fsdp2" else "ReplicatedLayout")
    assert r["group_types"] == (["DTensor"] if mode == "fsdp2" else ["Parameter"])
    assert r["sgdsai_warnings"] == []  # AcceleratedOptimizer's state-dict round trip is silent
    assert r["param_rel_err"] < PARAM_RTOL and r["table_rel_err"] < TABLE_RTOL, r
    assert r["table_names"][0] == "model.embed_tokens.weight"


@pytest.mark.gpu
def test_accelerate_fsdp2_on_gpu(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    r = torchrun("accelerate_ranks.py", tmp_path / "out.json", "fsdp2", nproc=nproc, timeout=300)
    assert r["is_fsdp2"] and r["layout"] == "DTensorLayout"
    assert r["sgdsai_warnings"] == []
    # CUDA vs the CPU reference: other kernels, same fp32 math.
    assert r["param_rel_err"] < 1e-4 and r["table_rel_err"] < 1e-4, r
