"""benchmarks/kernel_rate.py runs and reports every case (one tiny piece: seconds)."""

from __future__ import annotations

import importlib.util

import pytest

from sai_dist import native_lowp
from tests.support.benchmarks import run_benchmark
from tests.support.paths import REPO


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
@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout: no revision to build")
def test_kernel_rate_against_a_revision_checks_bits_and_times_both(tmp_path):
    """``--against HEAD``: the committed kernel built beside this tree's, the bits compared
    case by case (each dtype pair with a bf16 parameter rounded stochastically and to
    nearest, and with no momentum) and both timed; the same source here, so all agree."""
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
    assert set(report["ns_per_element"]) == set(against["ns_per_element"])
    timed = set(report["ns_per_element"])
    nearest = {f"{case}[nearest]" for case in timed}
    no_momentum = {"no_momentum_fp32_params", "no_momentum_bf16_params"}
    assert set(against["same_bits"]) == timed | nearest | no_momentum
    assert all(against["same_bits"].values()), against["same_bits"]
    assert all(0 < r < 1e3 for r in against["this_vs_against"].values()), against["this_vs_against"]


@pytest.mark.skipif(
    native_lowp.library() is None, reason=f"no native low-precision kernel: {native_lowp._reason}"
)
def test_the_bit_comparison_finds_a_kernel_that_draws_other_bits():
    """``--against``'s bit check on a kernel whose hash has another constant: every case
    that draws random bits differs, the fp32 parameter with fp32 momentum (no draws) and
    the unrounded no-momentum case do not."""
    spec = importlib.util.spec_from_file_location("kernel_rate", REPO / "benchmarks" / "kernel_rate.py")
    kernel_rate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_rate)
    assert native_lowp._SOURCE.count("0x5bd1e995") >= 2  # the scalar hash and each vector one
    other = native_lowp._SOURCE.replace("0x5bd1e995", "0x5bd1e997")
    lib = native_lowp._load(native_lowp.isa_flags(), other, "sai_lowp_test_other_hash")
    assert lib is not None, native_lowp._reason
    same = kernel_rate._same_bits(native_lowp.library(), lib)
    unrounded = {"fp32_state", "fp32_state[nearest]", "no_momentum_fp32_params"}
    assert {name for name, equal in same.items() if equal} == unrounded, same
