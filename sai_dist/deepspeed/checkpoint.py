"""World-size-free DeepSpeed optimizer checkpoints: :func:`save_optimizer_state` writes, per
original parameter (by its name in the user's model, :mod:`sai_dist.names`), the fp32
master weight, the momentum buffer and the fixed g-SNR and scale; :func:`load_optimizer_state`
loads that into an engine of any world size and ZeRO stage."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sai_dist import momentum as lowp
from sai_dist.collectives import all_reduce
from sai_dist.deepspeed.engine import param_names, wrapper_kind
from sai_dist.layouts.zero import FlatSegmentLayout
from sai_dist.optimizer import SGDSaI
from sai_dist.state_keys import GSNR, GSNR_MAX, MOMENTUM, SCALE
from sai_dist.table import block_values, find_sgdsai

__all__ = ["CHECKPOINT_FORMAT", "load_optimizer_state", "save_optimizer_state"]

CHECKPOINT_FORMAT = "sai_dist.deepspeed.optimizer/1"


def _sai_and_layout(engine: Any) -> tuple[SGDSaI, FlatSegmentLayout | None]:
    sai = find_sgdsai(engine)
    layout = sai.layout if isinstance(sai.layout, FlatSegmentLayout) else None
    return sai, layout


def _gather_blocks(
    layout: FlatSegmentLayout, local: Callable[[Tensor], Tensor | None]
) -> list[Tensor] | None:
    """Full flattened fp32 copies of every block assembled from the flats' segments;
    ``local(flat)`` returns the flat-shaped tensor to read (``None`` to skip). One
    all-reduce (sum) over the layout's group: segments are disjoint across ranks."""
    numels = layout.block_numels
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + n)
    buf = torch.zeros(starts[-1], dtype=torch.float32)
    have = torch.zeros(1)
    for flat in layout.flats:
        src = local(flat)
        if src is None:
            continue
        have += 1
        src = src.detach().reshape(-1).to("cpu", torch.float32)
        for s in layout.segments(flat):
            lo = starts[s.block] + s.offset
            buf[lo : lo + s.stop - s.start] = src[s.start : s.stop]
    if layout.group is not None:
        both = all_reduce(torch.cat([buf, have]), layout.group)
        buf, have = both[:-1], both[-1:]
    if float(have) == 0:
        return None
    return [buf[starts[b] : starts[b + 1]].clone() for b in range(len(numels))]


def save_optimizer_state(engine: Any, path: str | os.PathLike) -> None:
    """Write SGD-SaI's world-size-free checkpoint: per original parameter (by name), the
    fp32 master weight, the momentum buffer and the fixed g-SNR and scale, plus
    ``gsnr_max`` and the param-group hyper-parameters.

    Collective: every rank calls it; rank 0 writes ``path`` (``torch.save``). Each rank
    assembles full copies of all parameters in CPU memory (4 bytes per element twice).
    Works for every wrapper :func:`attach` supports, at any world size.
    """
    sai, layout = _sai_and_layout(engine)
    names = param_names(engine.module)
    entries: dict[str, dict[str, Any]] = {}
    if layout is None:
        for group in sai.param_groups:
            for p in group["params"]:
                state = sai.state.get(p, {})
                entry: dict[str, Any] = {"param": p.detach().to("cpu", torch.float32).clone()}
                momentum = lowp.decoded_momentum(state, sai.layout, p)
                if momentum is not None:
                    entry["momentum"] = momentum.detach().to("cpu", torch.float32).clone()
                if GSNR in state:
                    entry["gsnr"], entry["scale"] = float(state[GSNR]), float(state[SCALE])
                entries[names[id(p)]] = entry
    else:
        weights = _gather_blocks(layout, lambda flat: flat)
        # Decoded (int8 / bf16 momentum): the checkpoint is float32 whatever the storage.
        momenta = _gather_blocks(
            layout, lambda flat: lowp.decoded_momentum(sai.state.get(flat, {}), layout, flat)
        )
        gsnr, scale = block_values(sai)
        for b, p in enumerate(layout.block_params):
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            assert weights is not None
            entry = {"param": weights[b].reshape(shape)}
            if momenta is not None:
                entry["momentum"] = momenta[b].reshape(shape)
            if not torch.isnan(gsnr[b]):
                entry["gsnr"], entry["scale"] = float(gsnr[b]), float(scale[b])
            entries[layout.block_name(b)] = entry
    gsnr_max = sai.gsnr_max()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "params": entries,
        "gsnr_max": gsnr_max,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sai.param_groups],
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def load_optimizer_state(engine: Any, path: str | os.PathLike, *, load_weights: bool = True) -> None:
    """Load a :func:`save_optimizer_state` checkpoint into ``engine``, whatever its world
    size and ZeRO stage: fp32 master weights (and the low-precision copies DeepSpeed
    trains with), momentum, g-SNR and scale, per original parameter by name.

    Every parameter the engine trains must be in the checkpoint (a ``KeyError`` names
    the missing ones). Param-group hyper-parameters (lr, ...) are left as configured.
    Every rank calls it.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a sai_dist DeepSpeed optimizer checkpoint ({payload.get('format')!r})"
        )
    entries: dict[str, dict[str, Any]] = payload["params"]
    gsnr_max = payload["gsnr_max"]
    sai, layout = _sai_and_layout(engine)
    names = param_names(engine.module)
    max_t = None if gsnr_max is None else torch.tensor(gsnr_max, dtype=torch.float32)

    def entry_for(name: str) -> dict[str, Any]:
        if name not in entries:
            missing = sorted(set(names.values()) - set(entries))
            raise KeyError(f"{path} has no entry for parameter(s) {missing[:10]}")
        return entries[name]

    if layout is None:
        for group in sai.param_groups:
            for p in group["params"]:
                e = entry_for(names[id(p)])
                if load_weights:
                    p.data.copy_(e["param"].reshape(p.shape))
                state = sai.state[p]
                if "momentum" in e:
                    # Encoded (rounding to nearest) into the optimizer's momentum_dtype.
                    loaded = {MOMENTUM: e["momentum"].reshape(p.shape).to(p.device, torch.float32).clone()}
                    lowp.restore_loaded(state, loaded, sai.layout, p, sai.momentum_dtype)
                if "gsnr" in e and max_t is not None:
                    state[GSNR] = torch.tensor(e["gsnr"], dtype=torch.float32)
                    state[SCALE] = torch.tensor(e["scale"], dtype=torch.float32)
                    state[GSNR_MAX] = max_t.clone()
        return

    blocks = [entry_for(layout.block_name(b)) for b in range(layout.num_blocks)]
    for flat in layout.flats:
        segs = layout.segments(flat)
        state = sai.state[flat]
        view = flat.data.reshape(-1)
        have_momentum = all("momentum" in blocks[s.block] for s in segs) and segs
        if have_momentum:
            buf = torch.zeros_like(flat.data)
            state[MOMENTUM] = buf
        for s in segs:
            e = blocks[s.block]
            n = s.stop - s.start
            if load_weights:
                view[s.start : s.stop].copy_(e["param"].reshape(-1)[s.offset : s.offset + n])
            if have_momentum:
                buf.reshape(-1)[s.start : s.stop].copy_(e["momentum"].reshape(-1)[s.offset : s.offset + n])
        if have_momentum:
            # Encoded (rounding to nearest) into the optimizer's momentum_dtype.
            lowp.restore_loaded(state, {MOMENTUM: buf}, layout, flat, sai.momentum_dtype)
        if max_t is not None and all("gsnr" in blocks[s.block] for s in segs):
            g = torch.tensor([blocks[s.block]["gsnr"] for s in segs], dtype=torch.float32)
            sc = torch.tensor([blocks[s.block]["scale"] for s in segs], dtype=torch.float32)
            state[GSNR] = g[0].clone() if len(segs) == 1 else g
            state[SCALE] = sc[0].clone() if len(segs) == 1 else sc
            state[GSNR_MAX] = max_t.clone()
    if load_weights:
        _push_master_weights(engine.optimizer)
    layout.table_cache = None
    if sai.initialized:
        block_values(sai, refresh=True)


def _push_master_weights(wrapper: Any) -> None:
    """Copy the fp32 master partitions into the weights the model computes with."""
    kind = wrapper_kind(wrapper)
    if kind == "zero12" or kind == "bf16":
        wrapper.update_lp_params()
    elif kind == "zero3":
        for i in range(len(wrapper.fp32_partitioned_groups_flat)):
            wrapper._reassign_or_swap_out_partitioned_parameters(i)
    elif kind == "fp16":
        for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            for lp, hp in zip(lp_group, hp_group, strict=True):
                lp.data.copy_(hp.data)
