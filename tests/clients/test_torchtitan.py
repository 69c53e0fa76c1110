"""torchtitan 0.3.0: ``optimizer_name="SGDSaI"`` in its OptimizersContainer (via
``import sai_dist.torchtitan``), FSDP2 on 2 ranks, checkpoint resume through DCP of the
container.

torchtitan pins a huggingface_hub that transformers 5.x refuses, so it lives in its own
venv, ``.venv-titan`` (made by scripts/setup.sh); the rank script runs with that venv's
python and this repository on PYTHONPATH. Skipped, with the reason, where it is absent.
"""

from __future__ import annotations

import pytest

from tests.clients.launch import TITAN_PYTHON, torchrun

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not TITAN_PYTHON.exists(),
        reason=f"torchtitan venv {TITAN_PYTHON.parent.parent} is absent: run scripts/setup.sh",
    ),
]


@pytest.fixture(scope="module")
def titan(tmp_path_factory):
    out = tmp_path_factory.mktemp("titan") / "result.json"
    return torchrun("titan_ranks.py", out, python=TITAN_PYTHON, timeout=240)


def test_container_builds_sgdsai_over_dtensors(titan):
    assert titan["optimizer_types"] == ["SGDSaI"]
    assert titan["layout"] == "DTensorLayout"
    assert titan["group_fused"] == [None]
    assert titan["adamw_resolves"]


def test_fsdp2_container_equals_single_process(titan):
    # fp32, 6 steps, 2 ranks: only the reduction order differs.
    assert titan["fsdp2_vs_single_rel_err"] < 1e-6
    assert titan["gsnr_table_vs_single_rel_err"] < 1e-6


def test_resume_through_container_is_bit_identical(titan):
    # 15 tensors x (momentum, gsnr, scale, gsnr_max), all saved and all restored.
    assert titan["saved_state_entries"] == 60
    assert titan["restored_state_entries"] == 60
    assert titan["initialized_after_load"] and titan["loaded_table_equal"]
    assert titan["load_warnings"] == []
    assert titan["resume_bit_identical"], titan["resume_max_abs_diff"]
