"""benchmarks/step_overhead.py runs and reports every case (a few tiny tensors: seconds)."""

from __future__ import annotations

from tests.support.benchmarks import run_benchmark


def test_step_overhead_reports_every_case(tmp_path):
    report = run_benchmark(
        "step_overhead.py", tmp_path / "overhead.json", "--tensors", "3", "--numel", "5000", "--repeats", "3"
    )
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
