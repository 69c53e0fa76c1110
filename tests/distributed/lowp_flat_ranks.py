"""Rank functions for tests/distributed/test_momentum_flat.py: int8 and bf16 momentum under
the flat layouts (DeepSpeed ZeRO-2/3, FSDP1) against the single-process run.

Every rank trains on the *same* full batch, so the wrapper's averaged gradient of identical
summands is exactly the single-process gradient (``g/2 + g/2`` and ``(g + g)/2`` are exact):
what differs from the single-process run is only how SGD-SaI's state is laid out. The
single-process reference is run in each rank process itself (same thread count, so the same
matmul bits), before the wrapped run.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor, nn

from tests.distributed.fsdp2_ranks import _plain  # tensors as numpy arrays across processes
from tests.support.paths import REPO

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))

SEED = 21
PARAMS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "eps": 1e-8, "seed": SEED}
SNAPSHOTS = (1, 3)  # steps after which the state is compared
ROWS = 16

#: (in, out, bias) per Linear layer.
#: zero2/fsdp1 aligned: 16384 + 128 + 8064 = 24576 elements = 2 x 12288, so rank 1 holds
#: W1[12288:16384) (starts on a 2048 multiple), b1 (small: float32 beside the int8 codes)
#: and W2 whole; rank 0 holds W1[0:12288).
ALIGNED_FLAT = ((128, 128, True), (128, 63, False))
#: zero3 aligned: every parameter splits in two halves of whole 2048-element blocks.
ALIGNED_ZERO3 = ((128, 128, True), (128, 64, False))
#: 9000 + 90 + 6300 + 70: rank 1's piece of W1 starts at 7730 (DeepSpeed), off any block.
UNALIGNED = ((100, 90, True), (90, 70, True))


def make_model(spec: tuple[tuple[int, int, bool], ...]) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, o, bias in spec:
        layers += [nn.Linear(i, o, bias=bias), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def batch(step: int, width: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(700 + step)
    return torch.randn(ROWS, width, generator=g), torch.randn(ROWS, generator=g)


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    return ((out.float().mean(-1) - y) ** 2).mean()


def _quant_step(st: dict[str, Any], n: int) -> Tensor:
    from sai_dist import momentum as lowp

    if "momentum_scale" not in st:
        return torch.zeros(n)
    return st["momentum_scale"].repeat_interleave(lowp.BLOCK)[:n]


def reference(spec: Any, momentum_dtype: str, bf16: bool = False) -> dict[int, dict[str, Any]]:
    """Single-process SGDSaI: per snapshot step, per parameter (model order) its values,
    decoded momentum, per-element quantization step and storage dtype.

    ``bf16``: what DeepSpeed's bf16 modes do, written out: the model computes in bf16,
    SGD-SaI steps float32 master copies on the bf16 gradients cast to float32 (exact), and
    the model takes the masters rounded to bf16; reported parameters are the bf16 ones."""
    import sai_dist
    from sai_dist import momentum as lowp

    model = make_model(spec)
    masters = list(model.parameters())
    if bf16:
        model = model.to(torch.bfloat16)
        masters = [p.detach().float().clone() for p in model.parameters()]
    opt = sai_dist.SGDSaI(masters, momentum_dtype=momentum_dtype, **PARAMS)
    out: dict[int, dict[str, Any]] = {}
    for step in range(max(SNAPSHOTS)):
        x, y = batch(step, spec[0][0])
        loss_fn(model(x.to(torch.bfloat16) if bf16 else x), y).backward()
        if bf16:
            for m, p in zip(masters, model.parameters(), strict=True):
                m.grad, p.grad = p.grad.float(), None
        opt.step()
        opt.zero_grad()
        if bf16:
            with torch.no_grad():
                for m, p in zip(masters, model.parameters(), strict=True):
                    p.copy_(m)
        if step + 1 in SNAPSHOTS:
            snap = {}
            for (name, p), m in zip(model.named_parameters(), masters, strict=True):
                st = opt.state[m]
                buf = st["momentum_buffer"].reshape(-1)
                snap[name] = {
                    "param": p.detach().reshape(-1).float().clone(),
                    "momentum": lowp.decode(buf, st.get("momentum_scale")).clone(),
                    "step": _quant_step(st, buf.numel()),
                    "kind": str(buf.dtype),
                }
            out[step + 1] = snap
    return out


def flat_state(sai: Any) -> dict[str, Any]:
    """This rank's SGD-SaI state over its flat tensors: per segment (block name, offset) its
    decoded momentum, quantization step per element and where it is kept (``int8``,
    ``small`` = float32 beside int8 codes, or the buffer's dtype), plus the bytes held."""
    from sai_dist import momentum as lowp

    layout = sai.layout
    segments = []
    held = 0
    for flat in layout.flats:
        st = sai.state.get(flat, {})
        if "momentum_buffer" not in st:
            continue
        held += sum(st[k].numel() * st[k].element_size() for k in st if k.startswith("momentum"))
        values = lowp.decoded_momentum(st, layout, flat).reshape(-1)
        segs = layout.segments(flat)
        lengths = [s.stop - s.start for s in segs]
        storage = lowp.stored_pieces(
            st["momentum_buffer"].dtype, [layout.block_numels[s.block] for s in segs], lengths
        )
        for k, s in enumerate(segs):
            n = s.stop - s.start
            step = torch.zeros(n)
            if storage.scale_starts[k] is not None:
                lo = storage.scale_starts[k]
                step = st["momentum_scale"][lo : lo + lowp.num_scales([n])].repeat_interleave(lowp.BLOCK)[:n]
            kind = "small" if storage.small[k] else str(st["momentum_buffer"].dtype)
            segments.append(
                {
                    "name": layout.block_name(s.block),
                    "offset": s.offset,
                    "momentum": values[s.start : s.stop].clone(),
                    "step": step.clone(),
                    "kind": kind,
                }
            )
    return {"segments": segments, "bytes": held}


def predicted_state_bytes(layout: Any, momentum_dtype: str) -> int:
    """The accounting of sai_dist.momentum for this rank's flat tensors: per tensor its
    pieces' original sizes and lengths, padding (a shard's end padding included) stored like
    the buffer; a view with no element here has no piece and costs 0 bytes."""
    from sai_dist import momentum as lowp

    return sum(
        lowp.state_bytes(
            momentum_dtype,
            [layout.block_numels[s.block] for s in layout.segments(flat)],
            [s.stop - s.start for s in layout.segments(flat)],
            torch.float32,
            buffer_numel=flat.numel(),
        )
        for flat in layout.flats
    )


def _zero_engine(stage: int, spec: Any, momentum_dtype: str, offload: bool, bf16: str | None) -> Any:
    """``bf16``: None (float32 weights), ``"zero"`` (bf16 weights, DeepSpeed's ZeRO
    optimizer keeps the float32 partitions) or ``"bf16_optimizer"`` (bf16 weights with
    float32 gradient accumulation at stage 1: DeepSpeed's BF16_Optimizer)."""
    import sai_dist.deepspeed as sds

    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": ROWS,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SGDSaI", "params": {**PARAMS, "momentum_dtype": momentum_dtype}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if bf16 == "bf16_optimizer":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    model = make_model(spec)
    engine, _, _, _ = sds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _zero_params(engine: Any) -> dict[str, Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
        return {n: p.detach().reshape(-1).float().clone() for n, p in engine.module.named_parameters()}


def zero_cases(rank: int, world: int, cases: list[dict[str, Any]], tmp: str) -> list[dict[str, Any]]:
    """Each case: ``name``, ``stage``, ``spec``, ``momentum_dtype``, ``offload``, ``bf16``
    (see :func:`_zero_engine`); per snapshot
    the gathered parameters and this rank's flat state; for the case with ``converter`` the
    world-size-free checkpoint saved and loaded back into the same engine."""
    import sai_dist
    import sai_dist.deepspeed as sds
    from sai_dist.memory import rank_memory

    torch.set_num_threads(1)
    results = []
    for case in cases:
        t0 = time.perf_counter()
        spec, md = case["spec"], case["momentum_dtype"]
        bf16 = case.get("bf16")
        ref = reference(spec, md, bf16=bool(bf16))
        t1 = time.perf_counter()
        engine = _zero_engine(case["stage"], spec, md, case.get("offload", False), bf16)
        sai = sai_dist.table.find_sgdsai(engine)
        t2 = time.perf_counter()
        snaps = {}
        for step in range(max(SNAPSHOTS)):
            x, y = batch(step, spec[0][0])
            engine.backward(loss_fn(engine(x.to(torch.bfloat16) if bf16 else x), y))
            engine.step()
            if step + 1 in SNAPSHOTS:
                snaps[step + 1] = {"params": _zero_params(engine), **flat_state(sai)}
        shapes = [tuple(p.shape) for p in make_model(spec).parameters()]
        # What `sai-dist memory --strategies zero<stage> --momentum-dtype ...` prints for this
        # rank (with offload the same bytes sit in host memory).
        memory = rank_memory(shapes, f"zero{case['stage']}", world, momentum_dtype=md, rank=rank)
        result = {
            "name": case["name"],
            "wrapper": type(engine.optimizer).__name__,
            "ref": ref,
            "snaps": snaps,
            "predicted": memory.state["sgd_sai"],
        }
        if case.get("converter"):
            # DeepSpeed's own checkpoint (same world size): one more step, then back to the
            # checkpoint and the same step again must give the same bits.
            ckpt = os.path.join(tmp, "ds_flat")
            engine.save_checkpoint(ckpt, tag="t")
            resumed = []
            for _ in range(2):
                x, y = batch(99, spec[0][0])
                engine.backward(loss_fn(engine(x), y))
                engine.step()
                resumed.append({"params": _zero_params(engine), **flat_state(sai)})
                engine.load_checkpoint(ckpt, tag="t")
            result["resumed"] = resumed
            before = flat_state(sai)
            path = os.path.join(tmp, "sai_flat.pt")
            sds.save_optimizer_state(engine, path)
            sds.load_optimizer_state(engine, path, load_weights=False)
            result["converted"] = {"before": before, "after": flat_state(sai)}
        engine.destroy()
        result["seconds"] = {"reference": t1 - t0, "init": t2 - t1, "train": time.perf_counter() - t2}
        results.append(result)
    return _plain(results)


def fsdp1_cases(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case: ``name``, ``spec``, ``momentum_dtype``, ``orig`` (``use_orig_params``): the
    whole model one FULL_SHARD FSDP1 unit, SGDSaI on ``flat_param_layout``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    import sai_dist
    from sai_dist.layouts import flat_param_layout

    torch.set_num_threads(1)
    results = []
    for case in cases:
        spec, md = case["spec"], case["momentum_dtype"]
        ref = reference(spec, md)
        model = FSDP1(make_model(spec), use_orig_params=case["orig"], device_id=torch.device("cpu"))
        layout = flat_param_layout(model)
        opt = sai_dist.SGDSaI(model.parameters(), layout=layout, momentum_dtype=md, **PARAMS)
        snaps = {}
        for step in range(max(SNAPSHOTS)):
            x, y = batch(step, spec[0][0])
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if step + 1 in SNAPSHOTS:
                with FSDP1.summon_full_params(model, writeback=False):
                    params = {
                        n.replace("_fsdp_wrapped_module.", ""): p.detach().reshape(-1).clone()
                        for n, p in model.named_parameters()
                    }
                snaps[step + 1] = {"params": params, **flat_state(opt)}
        predicted = predicted_state_bytes(layout, md)
        results.append({"name": case["name"], "ref": ref, "snaps": snaps, "predicted": predicted})
    return _plain(results)


def fairscale_cases(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fairscale FSDP's flat shards on CPU, as tests/distributed/fairscale_fsdp_ranks.py
    builds them (the real wrapper needs CUDA): fairscale's own FlatParameter metadata and
    shard cutting, gradients averaged and sharded as its reduce-scatter leaves them, the
    shards gathered back into a replica after each step. Each case: ``name``, ``spec``,
    ``momentum_dtype``, ``flatten``."""

    import sai_dist
    from sai_dist.layouts import flat_param_layout
    from tests.distributed.fairscale_fsdp_ranks import SyntheticUnit, synthetic_step

    torch.set_num_threads(1)
    results = []
    for case in cases:
        spec, md = case["spec"], case["momentum_dtype"]
        ref = reference(spec, md)
        unit = SyntheticUnit(make_model(spec), rank, world, case["flatten"])
        replica = make_model(spec)
        layout = flat_param_layout(unit)
        opt = sai_dist.SGDSaI(unit.parameters(), layout=layout, momentum_dtype=md, **PARAMS)
        sources = [list(replica.parameters())] if case["flatten"] else [[q] for q in replica.parameters()]
        snaps = {}
        for step in range(max(SNAPSHOTS)):
            replica.zero_grad()
            x, y = batch(step, spec[0][0])
            loss_fn(replica(x), y).backward()
            synthetic_step(unit, sources, opt, world)
            if step + 1 in SNAPSHOTS:
                params = {n: q.detach().reshape(-1).clone() for n, q in replica.named_parameters()}
                snaps[step + 1] = {"params": params, **flat_state(opt)}
        predicted = predicted_state_bytes(layout, md)
        results.append({"name": case["name"], "ref": ref, "snaps": snaps, "predicted": predicted})
    return _plain(results)
