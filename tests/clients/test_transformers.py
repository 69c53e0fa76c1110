"""Hugging Face Trainer (transformers 5.24) with SGDSaI, compared with single-process SGDSaI
on the same batches (tiny LlamaForCausalLM, 4 steps): a client optimizer,
``optimizer_cls_and_kwargs``, and DeepSpeed ZeRO-2/3 on 2 ranks with
``"optimizer": {"type": "SGDSaI"}`` or ``optimizer_cls_and_kwargs`` under ZeRO-2."""

from __future__ import annotations

import pytest

from tests.clients.launch import torchrun

pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[clients]'")
pytestmark = pytest.mark.distributed

# One process: the same arithmetic as the reference, bit for bit. Two ranks: gradients
# averaged in another order (ZeRO reduce-scatters them in flat fp32 buckets).
EXACT = 0.0
TWO_RANK_RTOL = 1e-6

CASES = {
    "client": (1, "ReplicatedLayout", EXACT),
    "cls_kwargs": (1, "ReplicatedLayout", EXACT),
    "zero2": (2, "FlatSegmentLayout", TWO_RANK_RTOL),
    "zero3": (2, "FlatSegmentLayout", TWO_RANK_RTOL),
    "zero2_cls": (2, "FlatSegmentLayout", TWO_RANK_RTOL),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_trainer_equals_single_process(mode, tmp_path):
    nproc, layout, rtol = CASES[mode]
    r = torchrun("transformers_ranks.py", tmp_path / "out.json", mode, nproc=nproc, timeout=420)
    assert r["steps"] == 4
    assert "SGDSaI" in r["optimizer_chain"], r["optimizer_chain"]
    assert r["layout"] == layout
    assert r["sgdsai_warnings"] == []
    assert r["param_rel_err"] <= rtol and r["table_rel_err"] <= rtol, r
    assert r["table_names"][0] == "model.embed_tokens.weight"
