"""Rank function for tests/clients/test_lightning.py: a LightningModule wrapped with FSDP1 as
Lightning's FSDPStrategy wraps it (``FullyShardedDataParallel(module, auto_wrap_policy=
{LlamaDecoderLayer}, use_orig_params=True)``), which Lightning itself only allows on CUDA;
SGD-SaI with the flat-parameter layout built from the wrapped module. Checks that
``gsnr_table`` names rows relative to the module passed in."""

from __future__ import annotations

from typing import Any

import torch

import sai_dist
from sai_dist.layouts import flat_param_layout
from tests.clients.common import HYPER, STEPS, compare, local_batch, loss_of, make_model, params_of


def fsdp1_lightning_module(rank: int, world: int) -> dict[str, Any]:
    import lightning as L
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class LitLlama(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # the root unit unshards here
            return loss_of(self.net, ids)

    lit = LitLlama()
    policy = ModuleWrapPolicy({LlamaDecoderLayer})
    wrapped = FSDP(lit, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    opt = sai_dist.SGDSaI(lit.parameters(), **HYPER, layout=flat_param_layout(wrapped))
    for step in range(STEPS):
        opt.zero_grad()
        wrapped(local_batch(step, rank, world)).backward()
        opt.step()
    result: dict[str, Any] = {
        name: list(sai_dist.gsnr_table(module, opt))
        for name, module in (("wrapped", wrapped), ("lit", lit), ("layer0", lit.net.model.layers[0]))
    }
    net_table = sai_dist.gsnr_table(lit.net, opt)
    with FSDP.summon_full_params(wrapped, writeback=False):
        params = params_of(lit.net)
    compare(result, params, net_table)
    result["net"] = list(net_table)
    try:
        sai_dist.gsnr_table(torch.nn.Linear(2, 2), opt)
        result["stranger"] = "no error"
    except ValueError as e:
        result["stranger"] = str(e)
    return result
