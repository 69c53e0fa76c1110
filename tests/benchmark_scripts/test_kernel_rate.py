"""benchmarks/kernel_rate.py runs and reports every case (one tiny piece: seconds)."""

from __future__ import annotations

import pytest

from sai_dist import native_lowp
from tests.support.benchmarks import run_benchmark


@pytest.mark.skipif(
    native_lowp.library() is None, reason=f"no native low-precision kernel: {native_lowp._reason}"
)
def test_kernel_rate_reports_every_case(tmp_path):
    report = run_benchmark(
        "kernel_rate.py", tmp_path / "rate.json", "--numel", "5000", "--repeats", "2", "--inner", "2"
    )
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


@pytest.mark.skipif(
    native_lowp.library() is None, reason=f"no native low-precision kernel: {native_lowp._reason}"
)
def test_kernel_rate_against_a_revision_checks_bits_and_times_both(tmp_path):
    """``--against HEAD``: the committed kernel built beside this tree's, the bits compared
    case by case and both timed (the same source here, so every case's bits agree)."""
    report = run_benchmark(
        "kernel_rate.py",
        tmp_path / "ab.json",
        "--numel",
        "5000",
        "--repeats",
        "2",
        "--inner",
        "2",
        "--against",
        "HEAD",
    )
    against = report["against"]
    assert against["rev"] == "HEAD"
    assert set(against["same_bits"]) == set(report["ns_per_element"]) == set(against["ns_per_element"])
    assert all(against["same_bits"].values()), against["same_bits"]
    assert all(0 < r < 1e3 for r in against["this_vs_against"].values()), against["this_vs_against"]
