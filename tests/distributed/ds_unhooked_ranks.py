"""Rank-side code for the safety test: SGD-SaI handed to ``deepspeed.initialize`` WITHOUT
``import sai_dist.deepspeed`` (so nothing attaches a layout). Deliberately imports nothing
from the integration: ZeRO rebinds the optimizer to flat partitions and SGD-SaI must
refuse to step them rather than compute g-SNR on a flat partition."""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from tests.distributed import ds_ranks


def plain_client_optimizer(rank: int, world: int, stage: int) -> dict[str, Any]:
    import deepspeed

    from sai_dist import SGDSaI
    from sai_dist.layouts import LayoutError

    torch.set_num_threads(1)
    assert "sai_dist.deepspeed" not in sys.modules
    model = ds_ranks.make_model()
    opt = SGDSaI(ds_ranks.param_groups(model), lr=0.05)
    cfg = ds_ranks.ds_config(stage)
    del cfg["optimizer"]
    cfg["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    before = [p.detach().clone() for p in engine.module.parameters()]
    x, y = ds_ranks.batch(0, ds_ranks.global_rows(1))
    xb, yb = (
        x[rank * ds_ranks.MICRO : (rank + 1) * ds_ranks.MICRO],
        y[rank * ds_ranks.MICRO : (rank + 1) * ds_ranks.MICRO],
    )
    engine.backward(F.mse_loss(engine(xb), yb))
    error = None
    try:
        engine.step()
    except LayoutError as exc:
        error = str(exc)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters(), strict=True))
    gsnr_states = sum(1 for s in opt.state.values() if "gsnr" in s)
    return {"error": error, "unchanged": unchanged, "gsnr_states": gsnr_states}
