"""Checkpoints of the training job: DCP for single/DDP/FSDP2/HSDP, the engine's own for
DeepSpeed.

Layout of ``runs/<name>/checkpoints/``::

    step_000100/            one checkpoint (DCP files, or a DeepSpeed tag folder)
        meta.json           step, format, world size, backend
        rng/rank<r>.pt      per-rank RNG states (CPU and CUDA)
    LATEST                  name of the newest *complete* checkpoint

A checkpoint is written under ``step_N.partial`` and renamed once every rank has finished,
so a job killed while writing leaves the previous checkpoint as the latest.

Model and optimizer state go through :mod:`torch.distributed.checkpoint.state_dict`
(fully-qualified names, sharding-independent), so a DDP checkpoint resumes under FSDP2 and
vice versa. SGD-SaI's state (``momentum_buffer`` and the g-SNR scalars) rides along like any
optimizer state; on load the optimizer's template is built from the checkpoint's metadata,
because an SGD-SaI optimizer has no state to template from before its first real step.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

LATEST = "LATEST"
META = "meta.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns when it runs without a process group; for --backend single that is the
    intended use (and a single-process run can resume a sharded checkpoint)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: str, step: int, model: nn.Module, optimizer: Any, engine: Any, meta: dict[str, Any]) -> str:
    """Write the checkpoint of ``step`` under ``root``; every rank must call it."""
    final = step_dir(root, step)
    partial = final + ".partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    _barrier()
    if engine is not None:
        engine.save_checkpoint(partial, tag="engine")
        fmt = "deepspeed"
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_ok():
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                checkpoint_id=partial,
                no_dist=not dist.is_initialized(),
            )
        fmt = "dcp"
    torch.save(rng_state(), os.path.join(partial, "rng", f"rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        with open(os.path.join(partial, META), "w") as f:
            json.dump({**meta, "step": step, "format": fmt}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
    _barrier()
    return final


def resolve(path: str) -> str:
    """The checkpoint folder ``path`` names: a checkpoint itself, a ``checkpoints`` folder or
    a run folder (its latest complete checkpoint)."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        latest = os.path.join(root, LATEST)
        if os.path.isfile(latest):
            with open(latest) as f:
                candidate = os.path.join(root, f.read().strip())
            if os.path.isfile(os.path.join(candidate, META)):
                return candidate
    raise FileNotFoundError(
        f"--resume {path!r}: no checkpoint there (expected a run folder with checkpoints/{LATEST}, "
        f"or a checkpoint folder with {META})"
    )


def read_meta(ckpt: str) -> dict[str, Any]:
    with open(os.path.join(ckpt, META)) as f:
        return json.load(f)


def _set_path(root: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = root
    for key, nxt in itertools.pairwise(path):
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _optim_template(ckpt: str, model: nn.Module) -> dict[str, Any]:
    """A nested optimizer state dict shaped like the saved one: state tensors with the shape
    of their parameter are templated by the (possibly sharded) parameter, so DCP reshards
    into the current layout; other tensors (step counts, g-SNR scalars) are plain."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = FileSystemReader(ckpt).read_metadata()
    params = dict(get_model_state_dict(model).items())
    template: dict[str, Any] = {}
    for key, item in md.state_dict_metadata.items():
        path = md.planner_data[key]
        if path[0] != "optim":
            continue
        if isinstance(item, BytesStorageMetadata):
            value: Any = None  # a Python object; DCP fills it in
        else:
            owner = params.get(path[2]) if len(path) >= 4 and path[1] == "state" else None
            if owner is not None and tuple(owner.shape) == tuple(item.size):
                value = torch.zeros_like(owner, dtype=item.properties.dtype)
            else:
                value = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        _set_path(template, path[1:], value)
    return template


def load(ckpt: str, model: nn.Module, optimizer: Any, engine: Any) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``ckpt``; returns its meta."""
    meta = read_meta(ckpt)
    fmt = meta.get("format")
    if fmt == "deepspeed":
        if engine is None:
            raise ValueError(f"{ckpt} is a DeepSpeed checkpoint; resume it with --backend deepspeed")
        engine.load_checkpoint(ckpt, tag="engine")
    elif fmt == "dcp":
        if engine is not None:
            raise ValueError(f"{ckpt} is a DCP checkpoint; DeepSpeed resumes only its own checkpoints")
        state = {"model": get_model_state_dict(model), "optim": _optim_template(ckpt, model)}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=ckpt, no_dist=not dist.is_initialized())
        with warnings.catch_warnings():
            # set_state_dict probes the optimizer with zero gradients to create its state;
            # SGD-SaI rightly refuses to fix g-SNR from that and says so.
            warnings.filterwarnings("ignore", message="SGDSaI: every gradient is zero")
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        raise ValueError(f"{ckpt}: unknown checkpoint format {fmt!r}")
    rng_file = os.path.join(ckpt, "rng", f"rank{_rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())
