"""Rank script for tests/clients/test_transformers.py (``torchrun ... OUT MODE``).

The Hugging Face ``Trainer`` trains the tiny Llama for 4 steps on the fixed batches (a
sequential sampler; accelerate hands rank r the r-th slice of each global batch), with a
constant learning rate and no gradient clipping so that single-process SGDSaI is the exact
reference. MODE:

* ``client``: ``optimizers=(SGDSaI(model.parameters(), ...), None)``;
* ``cls_kwargs``: ``optimizer_cls_and_kwargs=(SGDSaI, {...})`` (the Trainer builds the groups:
  ``args.weight_decay`` on matrices, none on norms; 0 here, so one reference fits);
* ``zero2`` / ``zero3``: a DeepSpeed config with ``"optimizer": {"type": "SGDSaI"}``, after
  ``import sai_dist.deepspeed``;
* ``zero2_cls``: ZeRO-2, no optimizer in the config, ``optimizer_cls_and_kwargs=(SGDSaI, ...)``.
  (Not ``optimizers=(SGDSaI(...), None)``: transformers' ``deepspeed_init`` drops a client
  optimizer and builds ``create_optimizer()``'s default, AdamW, without a word.)
"""

from __future__ import annotations

import importlib
import sys
import warnings

import torch
from torch.utils.data import Dataset, SequentialSampler

import sai_dist
from tests.clients.common import GLOBAL_BATCH, HYPER, STEPS, batch, compare, make_model, params_of, write


class Batches(Dataset):
    """Row i of the global batch of step s at index s * GLOBAL_BATCH + i."""

    def __len__(self) -> int:
        return STEPS * GLOBAL_BATCH

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = batch(i // GLOBAL_BATCH)[i % GLOBAL_BATCH]
        return {"input_ids": ids, "labels": ids}


def ds_config(stage: int, with_optimizer: bool) -> dict:
    cfg: dict = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
    }
    if with_optimizer:
        cfg["optimizer"] = {"type": "SGDSaI", "params": dict(HYPER)}
    return cfg


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    from transformers import Trainer, TrainingArguments

    if mode.startswith("zero"):
        importlib.import_module("sai_dist.deepspeed")  # before the Trainer builds the engine

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    hyper = dict(HYPER, weight_decay=0.0) if mode in ("cls_kwargs", "zero2_cls") else HYPER
    kwargs: dict = {}
    if mode.startswith("zero"):
        stage = int(mode[4])
        kwargs["deepspeed"] = ds_config(stage, with_optimizer=mode != "zero2_cls")
    args = TrainingArguments(
        output_dir=out + ".trainer",
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=hyper["lr"],
        weight_decay=hyper["weight_decay"],
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
        ddp_backend="gloo" if world > 1 else None,
        **kwargs,
    )
    model = make_model()
    trainer_kwargs: dict = {}
    if mode == "client":
        trainer_kwargs["optimizers"] = (sai_dist.SGDSaI(model.parameters(), **hyper), None)
    elif mode in ("cls_kwargs", "zero2_cls"):
        trainer_kwargs["optimizer_cls_and_kwargs"] = (
            sai_dist.SGDSaI,
            {"lr": hyper["lr"], "momentum": hyper["momentum"]},
        )
    trainer = SequentialTrainer(model=model, args=args, train_dataset=Batches(), **trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    result: dict = {"sgdsai_warnings": [str(w.message) for w in caught if "SGDSaI" in str(w.message)]}
    chain, obj = [], trainer.optimizer
    for _ in range(5):
        chain.append(type(obj).__name__)
        obj = getattr(obj, "optimizer", None)
    result["optimizer_chain"] = chain
    sai = sai_dist.table.find_sgdsai(trainer.model_wrapped if mode.startswith("zero") else trainer.optimizer)
    result["layout"] = type(sai.layout).__name__
    result["steps"] = trainer.state.global_step
    if mode.startswith("zero"):
        from deepspeed.utils import safe_get_full_fp32_param

        module = trainer.model_wrapped.module
        params = {
            name: safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for name, p in module.named_parameters()
        }
        table = sai_dist.gsnr_table(trainer.model_wrapped, trainer.model_wrapped)
    else:
        params = params_of(trainer.model)
        table = sai_dist.gsnr_table(trainer.model, sai)
    compare(result, params, table, hyper)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        write(out, result)


if __name__ == "__main__":
    main()
