"""benchmarks/step_overhead.py runs and reports every case (a few tiny tensors: seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.paths import REPO


def test_step_overhead_reports_every_case(tmp_path):
    out = tmp_path / "overhead.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/step_overhead.py"),
            *("--tensors", "3", "--numel", "5000", "--repeats", "3", "--write", str(out)),
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        check=True,
        timeout=300,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["tensors"] == 3 and report["numel"] == 5000 and report["repeats"] == 3
    cases = {
        "fp32_state",
        "int8_momentum",
        "bf16_momentum",
        "bf16_params_int8_momentum",
        "bf16_params_bf16_momentum",
    }
    assert set(report["step_us"]) == cases
    assert all(0 < us < 1e6 for us in report["step_us"].values()), report["step_us"]
