"""The tensor/pipeline-parallel runs against the single-process reference (shared by
test_tensor_parallel.py and test_pipeline_parallel.py)."""

from __future__ import annotations

from typing import Any

from tests.distributed import parallel3d_ranks

PARAM_RTOL = 1e-5
GSNR_RTOL = 1e-6


def check(results: list[dict[str, Any]], ref: dict[str, Any], step1: dict[str, int]) -> tuple[float, float]:
    """Every rank's parameters and g-SNR table against the reference; step collectives."""
    param_err = table_err = 0.0
    for out in results:
        if step1:
            assert out["step_counts"][0] == step1, out["coord"]
            assert out["step_counts"][1:] == [{}] * (parallel3d_ranks.STEPS - 1), out["coord"]
        assert out["params"], out["coord"]
        for name, got in out["params"].items():
            want = ref["params"][name]
            assert got.shape == want.shape, name
            param_err = max(param_err, float((got - want).abs().max() / want.abs().max()))
        assert list(out["table"]) == [n for n in ref["table"] if n in out["params"]]
        for name, row in out["table"].items():
            assert row["numel"] == ref["table"][name]["numel"], name
            for key in ("gsnr", "scale"):
                want = ref["table"][name][key]
                table_err = max(table_err, abs(row[key] - want) / abs(want))
    print(f"{len(results)} ranks: params rel err {param_err:.2e}, g-SNR/scale rel err {table_err:.2e}")
    assert param_err <= PARAM_RTOL
    assert table_err <= GSNR_RTOL
    return param_err, table_err
