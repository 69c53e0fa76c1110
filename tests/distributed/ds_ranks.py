"""Rank-side code for the DeepSpeed tests (spawned by tests/support/ranks.py::run_ranks).

A tiny model with two param groups whose parameters straddle ZeRO partition boundaries at
2 ranks; the global batch of every step is a deterministic function of the step, split
evenly over ranks and micro-steps, so a single-process run on the whole batch is the
exact reference (DeepSpeed averages gradients over ranks and accumulation steps).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.paths import REPO

ROOT = REPO
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))

IN, HID, HID2, OUT = 7, 5, 4, 3
MICRO = 2  # rows per rank per micro-step at 2 ranks


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID2), nn.Tanh(), nn.Linear(HID2, OUT))


def param_groups(model: nn.Module, lr: float = 0.05) -> list[dict[str, Any]]:
    """Biases (no decay, their own lr) and weights (decayed): two groups of three, so
    ZeRO's round-robin ordering really reorders them at 2 ranks. The largest g-SNR is a
    weight's, in the LAST group: a step 1 that normalised group by group would get the
    first group's scales wrong."""
    named = dict(model.named_parameters())
    return [
        {"params": [named[f"{i}.bias"] for i in (0, 2, 4)], "weight_decay": 0.0, "lr": 2 * lr},
        {"params": [named[f"{i}.weight"] for i in (0, 2, 4)], "weight_decay": 0.01},
    ]


def batch(step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(rows, IN, generator=g)
    # A target with a large offset keeps |mean| >> std for some gradients.
    y = torch.randn(rows, OUT, generator=g) + torch.tensor([3.0, -1.0, 0.5])
    return x, y


def global_rows(gas: int) -> int:
    """Rows of one optimizer step's global batch: the same at every world size."""
    return MICRO * 2 * gas


def ds_config(stage: int, **over: Any) -> dict[str, Any]:
    """A DeepSpeed config for the tiny model; ``over`` keys: gas, clip, bf16, offload,
    round_robin, sub_group_size, micro (rows per rank per micro-step)."""
    gas = over.get("gas", 1)
    zero: dict[str, Any] = {"stage": stage}
    if over.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if over.get("round_robin"):
        zero["round_robin_gradients"] = True
    if "sub_group_size" in over:
        zero["sub_group_size"] = over["sub_group_size"]
    if stage == 3:
        # Partition every parameter, however small.
        zero["stage3_param_persistence_threshold"] = 0
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": over.get("micro", MICRO),
        "gradient_accumulation_steps": gas,
        "optimizer": {
            "type": "SGDSaI",
            "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "eps": 1e-8},
        },
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # DeepSpeed clips at 1.0 unless told otherwise; the reference must know.
    cfg["gradient_clipping"] = over.get("clip", 0.0)
    if over.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    if over.get("fp32_accum"):
        # ZeRO-1 + bf16 + fp32 gradient accumulation: DeepSpeed picks BF16_Optimizer.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def train_engine(engine: Any, steps: range, gas: int, world: int, rank: int, bf16: bool = False) -> None:
    rows = global_rows(gas)
    per = rows // (world * gas)
    for step in steps:
        x, y = batch(step, rows)
        for micro in range(gas):
            lo = (micro * world + rank) * per
            xb, yb = x[lo : lo + per], y[lo : lo + per]
            if bf16:
                xb = xb.to(torch.bfloat16)
            out = engine(xb)
            loss = F.mse_loss(out.float(), yb)
            engine.backward(loss)
            engine.step()


def full_params(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's parameters as DeepSpeed itself gathers them (fp32 numpy copies)."""
    import deepspeed

    from sai_dist.names import unwrapped_name

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
        # numpy, not torch: tensors would travel back through shared memory that dies
        # with the rank process.
        return {
            unwrapped_name(engine.module, n): p.detach().float().numpy().copy()
            for n, p in engine.module.named_parameters()
        }


def build(cfg: dict[str, Any], route: str = "initialize", tmp: str | None = None) -> tuple[Any, Any]:
    """An engine on the tiny model. ``route``: ``initialize`` (sai_dist.deepspeed.initialize
    with the config dict), ``json`` (same, from a JSON file), ``client`` (an SGDSaI passed
    as ``optimizer=``), ``plain`` (the user calls ``deepspeed.initialize`` itself after
    ``import sai_dist.deepspeed``)."""
    import json

    import deepspeed

    import sai_dist.deepspeed as sds

    model = make_model()
    if route == "json":
        assert tmp is not None
        path = os.path.join(tmp, f"ds_{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        engine, opt, _, _ = sds.initialize(model=model, model_parameters=param_groups(model), config=path)
    elif route == "client":
        # A client optimizer instead of the config section (offload then needs
        # zero_force_ds_cpu_optimizer: false, which initialize sets).
        from sai_dist import SGDSaI

        params = cfg.pop("optimizer")["params"]
        opt = SGDSaI(param_groups(model, params["lr"]), **params)
        engine, opt, _, _ = sds.initialize(model=model, optimizer=opt, config=cfg)
    elif route == "plain":
        engine, opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model), config=cfg
        )
    else:
        engine, opt, _, _ = sds.initialize(model=model, model_parameters=param_groups(model), config=cfg)
    return engine, opt


def _untouched_after_init(engine: Any) -> bool:
    """After ``initialize``: g-SNR not fixed, no momentum, and (stage 0 fp16/bf16, whose
    wrapper steps the optimizer with zero gradients while it is built) the fp32 masters
    still bit-equal to the model weights, i.e. no weight decay was applied."""
    import sai_dist

    sai = sai_dist.table.find_sgdsai(engine)
    if sai.initialized or any("momentum_buffer" in s for s in sai.state.values()):
        return False
    masters = getattr(engine.optimizer, "fp32_groups", None)
    if masters is not None:
        for lp_group, hp_group in zip(engine.optimizer.fp16_groups, masters, strict=True):
            for lp, hp in zip(lp_group, hp_group, strict=True):
                if not torch.equal(lp.float(), hp):
                    return False
        # And the masters are the initial weights (bf16-rounded), not something else.
        init = {n: p.detach() for n, p in make_model().named_parameters()}
        for name, p in engine.module.named_parameters():
            if not torch.equal(p.float(), init[name.removeprefix("module.")].to(p.dtype).float()):
                return False
    return True


def run_cases(rank: int, world: int, cases: list[dict[str, Any]], tmp: str) -> list[dict[str, Any]]:
    """Train each case for ``steps`` steps; report g-SNR table after step 1, final
    parameters, wrapper type, state bytes and timings."""
    import sai_dist

    torch.set_num_threads(1)
    results = []
    for case in cases:
        t0 = time.perf_counter()
        cfg = ds_config(case["stage"], **case.get("over", {}))
        engine, opt = build(cfg, case.get("route", "initialize"), tmp)
        t_init = time.perf_counter() - t0
        init_untouched = _untouched_after_init(engine)
        gas = case.get("over", {}).get("gas", 1)
        bf16 = bool(case.get("over", {}).get("bf16"))
        t1 = time.perf_counter()
        train_engine(engine, range(1), gas, world, rank, bf16)
        table_engine = sai_dist.gsnr_table(engine.module, engine)
        table_opt = sai_dist.gsnr_table(engine.module, opt)
        train_engine(engine, range(1, case.get("steps", 10)), gas, world, rank, bf16)
        t_train = time.perf_counter() - t1
        sai = sai_dist.table.find_sgdsai(engine)
        state_bytes = sum(
            s["momentum_buffer"].numel() * s["momentum_buffer"].element_size()
            for s in sai.state.values()
            if "momentum_buffer" in s
        )
        wrapper = engine.optimizer
        flats = (
            getattr(wrapper, "single_partition_of_fp32_groups", None)
            or getattr(wrapper, "fp32_partitioned_groups_flat", None)
            or getattr(wrapper, "fp32_groups_flat_partition", None)
            or []
        )
        flat_numel = sum(f.numel() for f in flats)
        rr = getattr(wrapper, "round_robin_bit16_groups", None)
        info = {
            "sub_groups": len(wrapper.fp16_groups)
            if hasattr(wrapper, "fp32_partitioned_groups_flat")
            else None,
            "rr_order": [[tuple(p.shape) for p in g] for g in rr] if rr else None,
            "bit16_order": [[tuple(p.shape) for p in g] for g in wrapper.bit16_groups] if rr else None,
        }
        results.append(
            {
                "name": case["name"],
                "wrapper": type(engine.optimizer).__name__,
                "table": table_engine,
                "table_opt": table_opt,
                "params": full_params(engine),
                "state_bytes": state_bytes,
                "flat_numel": flat_numel,
                "info": info,
                "init_untouched": init_untouched,
                "t_init": t_init,
                "t_train": t_train,
            }
        )
        engine.destroy()
    return results


def checkpoint_roundtrip(rank: int, world: int, stage: int, tmp: str, over: dict[str, Any]) -> dict[str, Any]:
    """5 steps, ``engine.save_checkpoint`` + ``save_optimizer_state``, 5 more steps; then a
    fresh engine loads the DeepSpeed checkpoint and runs the same 5 steps."""
    import sai_dist
    import sai_dist.deepspeed as sds

    torch.set_num_threads(1)
    gas = over.get("gas", 1)
    cfg = ds_config(stage, **over)
    engine, _ = build(cfg)
    train_engine(engine, range(5), gas, world, rank)
    ckpt = os.path.join(tmp, f"ds_z{stage}")
    engine.save_checkpoint(ckpt, tag="step5")
    sds.save_optimizer_state(engine, os.path.join(tmp, f"sai_z{stage}.pt"))
    table_a = sai_dist.gsnr_table(engine.module, engine)
    train_engine(engine, range(5, 10), gas, world, rank)
    params_a = full_params(engine)
    engine.destroy()

    engine, _ = build(cfg)
    engine.load_checkpoint(ckpt, tag="step5")
    table_b = sai_dist.gsnr_table(engine.module, engine)
    train_engine(engine, range(5, 10), gas, world, rank)
    params_b = full_params(engine)
    engine.destroy()
    return {"params_a": params_a, "params_b": params_b, "table_a": table_a, "table_b": table_b}


def converter_load(rank: int, world: int, stage: int, tmp: str, over: dict[str, Any]) -> dict[str, Any]:
    """A fresh engine at this world size loads the world-size-free checkpoint written at
    2 ranks and runs steps 5..9 on the same global batches."""
    import sai_dist
    import sai_dist.deepspeed as sds

    torch.set_num_threads(1)
    gas = over.get("gas", 1)
    cfg = ds_config(stage, micro=global_rows(gas) // (world * gas), **over)
    engine, _ = build(cfg)
    sds.load_optimizer_state(engine, os.path.join(tmp, f"sai_z{stage}.pt"))
    table = sai_dist.gsnr_table(engine.module, engine)
    train_engine(engine, range(5, 10), gas, world, rank)
    params = full_params(engine)
    engine.destroy()
    return {"params": params, "table": table}


def shipped_configs(rank: int, world: int, paths: list[str], steps: int) -> list[dict[str, Any]]:
    """Each config file of configs/ as shipped (micro batch 8 there; our batches are
    smaller, which DeepSpeed does not check), through ``sai_dist.deepspeed.initialize``
    with plain ``model.parameters()``."""
    import sai_dist
    import sai_dist.deepspeed as sds

    torch.set_num_threads(1)
    out = []
    for path in paths:
        model = make_model()
        engine, _, _, _ = sds.initialize(model=model, model_parameters=model.parameters(), config=path)
        train_engine(engine, range(steps), 1, world, rank)
        out.append(
            {
                "path": path,
                "wrapper": type(engine.optimizer).__name__,
                "table": sai_dist.gsnr_table(engine.module, engine),
                "params": full_params(engine),
            }
        )
        engine.destroy()
    return out
