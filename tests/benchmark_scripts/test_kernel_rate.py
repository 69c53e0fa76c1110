"""benchmarks/kernel_rate.py runs and reports every case (one tiny piece: seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sai_dist import native_lowp
from tests.support.paths import REPO


@pytest.mark.skipif(
    native_lowp.library() is None, reason=f"no native low-precision kernel: {native_lowp._reason}"
)
def test_kernel_rate_reports_every_case(tmp_path):
    out = tmp_path / "rate.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/kernel_rate.py"),
            *("--numel", "5000", "--repeats", "2", "--inner", "2", "--write", str(out)),
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        check=True,
        timeout=300,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["numel"] == 5000 and report["repeats"] == 2 and report["inner"] == 2
    cases = {
        "fp32_state",
        "int8_momentum",
        "bf16_momentum",
        "bf16_params_int8_momentum",
        "bf16_params_bf16_momentum",
    }
    assert set(report["ns_per_element"]) == cases
    assert all(0 < ns < 1e6 for ns in report["ns_per_element"].values()), report["ns_per_element"]
    assert report["vs_fp32_state"]["fp32_state"] == 1.0
