"""Lightning 2.6: ``configure_optimizers`` returns SGDSaI; 2 ranks on CPU compared with
single-process SGDSaI on the same batches (tiny LlamaForCausalLM, 4 steps). FSDPStrategy
and DeepSpeedStrategy need CUDA in Lightning: ``gpu`` tests; the FSDP1 wrapping that
FSDPStrategy applies is exercised on CPU directly for ``gsnr_table``'s names."""

from __future__ import annotations

import pytest

from tests.clients.launch import torchrun
from tests.support.ranks import run_ranks

pytest.importorskip("lightning", reason="lightning is not installed: pip install -e '.[clients]'")
pytestmark = pytest.mark.distributed

PARAM_RTOL = 1e-6
TABLE_RTOL = 1e-6
NET_NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize(
    ("strategy", "layout"), [("ddp", "ReplicatedLayout"), ("model_parallel", "DTensorLayout")]
)
def test_lightning_equals_single_process(strategy, layout, tmp_path):
    r = torchrun("lightning_ranks.py", tmp_path / "out.json", strategy, timeout=240)
    assert r["layout"] == layout
    assert r["param_rel_err"] < PARAM_RTOL and r["table_rel_err"] < TABLE_RTOL, r
    assert r["table_names"][:2] == NET_NAMES
    assert r["module_table_names"][:2] == ["net." + n for n in NET_NAMES]


def test_gsnr_table_names_relative_to_the_module_passed():
    from tests.clients import lightning_fsdp1_ranks

    for r in run_ranks(lightning_fsdp1_ranks.fsdp1_lightning_module, 2, timeout=240):
        assert r["net"][:2] == NET_NAMES
        assert r["lit"][:2] == r["wrapped"][:2] == ["net." + n for n in NET_NAMES]
        assert r["layer0"][:2] == ["self_attn.q_proj.weight", "self_attn.k_proj.weight"], r["layer0"]
        assert len(r["layer0"]) == 9  # a part of the model: its rows only
        assert r["param_rel_err"] < PARAM_RTOL and r["table_rel_err"] < TABLE_RTOL, r
        assert "neither the module this flat-parameter layout was built from" in r["stranger"]


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_lightning_cuda_strategies(strategy, tmp_path):
    r = torchrun("lightning_ranks.py", tmp_path / "out.json", strategy, timeout=300)
    assert r["param_rel_err"] < 1e-4 and r["table_rel_err"] < 1e-4, r
    assert r["table_names"][:2] == NET_NAMES
