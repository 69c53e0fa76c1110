"""A wrapper driving SGDSaI without its integration import gets an error naming that import
(fairscale OSS, DeepSpeed ZeRO with a client SGDSaI), on every rank, with nothing changed."""

from __future__ import annotations

import pytest

from tests.support.ranks import run_ranks

pytestmark = pytest.mark.distributed


def test_oss_without_import_names_the_import():
    pytest.importorskip("fairscale")
    from tests.clients import hint_ranks

    for r in run_ranks(hint_ranks.oss_without_integration, 2, timeout=240):
        assert r["error_type"] == "LayoutError", r
        assert "fairscale's OSS without its sai_dist integration" in r["error"]
        assert "`import sai_dist.fairscale`" in r["error"]
        assert "check_ranks=False" not in r["error"]
        assert r["unchanged"] and r["state"] == 0


def test_deepspeed_client_without_import_names_the_import():
    pytest.importorskip("deepspeed")
    from tests.distributed import ds_unhooked_ranks

    for r in run_ranks(ds_unhooked_ranks.plain_client_optimizer, 2, 2, timeout=300):
        assert "DeepSpeed without its sai_dist integration" in r["error"], r["error"]
        assert "`import sai_dist.deepspeed`" in r["error"]
        assert r["unchanged"] and r["gsnr_states"] == 0
