"""Rank script for tests/clients/test_lightning.py (``torchrun ... OUT STRATEGY``).

A LightningModule holding the tiny Llama as ``self.net``; ``configure_optimizers``
returns SGDSaI as it would AdamW. Lightning picks up torchrun's environment (2 processes,
gloo on CPU). Each rank's dataloader yields its slice of the global batch, with Lightning's
distributed sampler off, so the steps are the single-process reference's.

STRATEGY: ``ddp``; ``model_parallel`` (ModelParallelStrategy, ``fully_shard`` per decoder
layer in ``configure_model``); ``fsdp`` (FSDPStrategy, FSDP1, with SGD-SaI's flat-parameter
layout built from the wrapped module); ``deepspeed`` (DeepSpeedStrategy ZeRO-2 with a
client SGDSaI after ``import sai_dist.deepspeed``; CUDA only in Lightning).
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch.utils.data import DataLoader

import sai_dist
from tests.clients.common import HYPER, STEPS, compare, local_batch, loss_of, make_model, params_of, write


def main() -> None:
    out, strategy_name = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    import lightning as L

    class LitLlama(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()
            self.sai: sai_dist.SGDSaI | None = None
            self.tables: dict[str, object] = {}

        def configure_model(self) -> None:
            if strategy_name == "model_parallel":
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for layer in self.net.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(self.net, mesh=mesh)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return loss_of(self.net, batch)

        def configure_optimizers(self) -> sai_dist.SGDSaI:
            kwargs = {}
            if strategy_name == "fsdp":
                from sai_dist.layouts import flat_param_layout

                kwargs["layout"] = flat_param_layout(self.trainer.strategy.model)
            self.sai = sai_dist.SGDSaI(self.parameters(), **HYPER, **kwargs)
            return self.sai

        def train_dataloader(self) -> DataLoader:
            rank, world = self.global_rank, self.trainer.world_size
            return DataLoader([local_batch(s, rank, world) for s in range(STEPS)], batch_size=None)

        def on_train_end(self) -> None:
            # Collective for the flat-parameter layout: every rank calls it.
            self.tables["net"] = sai_dist.gsnr_table(self.net, self.sai)
            self.tables["module"] = sai_dist.gsnr_table(self, self.sai)

    if strategy_name == "ddp":
        strategy = "ddp"
    elif strategy_name == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    elif strategy_name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True)
    else:
        importlib.import_module("sai_dist.deepspeed")  # Lightning calls deepspeed.initialize
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=2)
    on_gpu = strategy_name == "deepspeed" or (torch.cuda.is_available() and strategy_name == "fsdp")
    lit = LitLlama()
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=2 if not on_gpu else min(2, torch.cuda.device_count()),
        strategy=strategy,
        max_steps=STEPS,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision="32-true",
    )
    trainer.fit(lit)
    result: dict[str, object] = {"layout": type(lit.sai.layout).__name__}
    if strategy_name == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            params = params_of(lit.net)
    else:
        params = params_of(lit.net)
    compare(result, params, lit.tables["net"])
    result["module_table_names"] = list(lit.tables["module"])[:3]
    if trainer.global_rank == 0:
        write(out, result)


if __name__ == "__main__":
    main()
