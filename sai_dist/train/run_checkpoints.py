"""The training job's run checkpoints: the run folder around :mod:`sai_dist.checkpoint`.

What is the job's here: the folder layout, atomic writes, the manifest and its
verification, the ``LATEST`` pointer, per-rank RNG state, the compatibility check against
the live run, and DeepSpeed engine checkpoints. Model and optimizer state (DCP, for
single/DDP/FSDP2/HSDP) are written and read by the library's one implementation,
:func:`sai_dist.checkpoint.save`/:func:`~sai_dist.checkpoint.load`.

Layout of ``runs/<name>/checkpoints/``::

    step_000100/            one checkpoint (DCP files, or a DeepSpeed tag folder)
        meta.json           step, format, world size, backend, optimizer, model signature
        rng/rank<r>.pt      per-rank RNG states (CPU and CUDA)
        manifest.json       size and SHA-256 of every other file in the folder
    LATEST                  name of the newest *complete* checkpoint

Atomicity: a checkpoint is written under ``step_N.partial``; once every rank has written
its files, the files are hashed into ``manifest.json`` (each rank hashes a share), the
folder is renamed to ``step_N`` and only then ``LATEST`` is replaced (write a temporary
file, fsync, ``os.replace``). A job killed at any point of a save leaves the previous
checkpoint complete and named by ``LATEST``; a leftover ``.partial`` folder is never read.

Verification (:func:`verify`), before any live object is touched: every file the manifest
names must exist with its recorded size and SHA-256, otherwise the load is refused with an
error naming the file. Then :func:`check_compatible` compares the saved model signature
(parameter names, shapes, dtypes) and optimizer with the live ones, naming the first
mismatch. The library reads into copies and sets the model and optimizer only once the
whole checkpoint was read, so a failure inside DCP cannot half-load it.

State goes by fully-qualified names (sharding-independent), so a DDP checkpoint resumes
under FSDP2 and vice versa. Runs with ``--tp``/``--pp`` save the optimizer state *flat*
(``state.<fqn>.<key>``, ``param_groups.<fqn>.<key>``; ``"optim_state": "flat"`` in
``meta.json``): pipeline stages hold different parameters in their param groups, which the
nested form keys by group index; keyed by parameter, every stage's entries survive and
each stage loads its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sai_dist import checkpoint as sai_checkpoint
from sai_dist.train import faults

LATEST = "LATEST"
META = "meta.json"
MANIFEST = "manifest.json"
# The tag on disk keeps the module's former name: checkpoints written before load unchanged.
MANIFEST_FORMAT = "sai_dist.train.checkpoint/2"
_STEP_DIR = re.compile(r"^step_(\d+)$")
FLAT = "flat"  # meta["optim_state"] of checkpoints with a flattened optimizer state dict
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: incomplete, corrupted, or for another model.
    Raised before any model or optimizer state is modified."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


def model_signature(module: nn.Module) -> dict[str, list[Any]]:
    """``{name: [shape, dtype]}`` of every parameter of the *unwrapped* model: global
    shapes (a DTensor's ``shape``, a ZeRO-3 parameter's ``ds_shape``), so the signature
    does not depend on the backend or world size."""
    sig: dict[str, list[Any]] = {}
    for name, p in module.named_parameters():
        shape = getattr(p, "ds_shape", None) or p.shape
        sig[name] = [list(shape), str(p.dtype).removeprefix("torch.")]
    return sig


# -- writing ---------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    # A rename is durable only once its directory is synced (power loss, node reboot).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, text: str) -> None:
    """Write ``path`` through a temporary file and ``os.replace``: readers see the old
    content or the new one, never a prefix."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _files(folder: str) -> list[str]:
    """Every regular file under ``folder`` (relative, sorted), the manifest excluded."""
    out = []
    for base, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_share(folder: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """This rank's share of the files (every world-th name): each is hashed once."""
    mine = names[_rank() :: _world()]
    return {
        n: {"bytes": os.path.getsize(os.path.join(folder, n)), "sha256": _sha256(os.path.join(folder, n))}
        for n in mine
    }


def save(
    root: str,
    step: int,
    model: nn.Module,
    optimizer: Any,
    engine: Any,
    meta: dict[str, Any],
) -> str:
    """Write the checkpoint of ``step`` under ``root`` atomically; every rank must call it.

    Returns the final folder. Until the rename at the end nothing but ``step_N.partial``
    has changed, so a kill anywhere before leaves ``LATEST`` and its checkpoint as they were.
    """
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
        sai_checkpoint.save(partial, model, optimizer, flatten=meta.get("optim_state") == FLAT)
        fmt = "dcp"
    torch.save(rng_state(), os.path.join(partial, "rng", f"rank{_rank()}.pt"))
    faults.maybe_die_in_save(step)  # test hook: this rank's files are written, the rest not
    _barrier()
    if _rank() == 0:
        with open(os.path.join(partial, META), "w") as f:
            json.dump({**meta, "step": step, "format": fmt, "manifest": MANIFEST_FORMAT}, f, indent=2)
    _barrier()
    # Every rank lists the same complete folder and hashes its share of it.
    names = _files(partial)
    entries: dict[str, dict[str, Any]] = {}
    for part in _all_gather(_hash_share(partial, names)):
        entries.update(part)
    if _rank() == 0:
        _write_durably(
            os.path.join(partial, MANIFEST),
            json.dumps({"format": MANIFEST_FORMAT, "files": dict(sorted(entries.items()))}, indent=1),
        )
        # Re-saving a step (a run resumed from an earlier checkpoint) must not delete the
        # old folder before the new one is in place: move it aside, rename, then drop it.
        old = None
        if os.path.exists(final):
            old = f"{final}.old{os.getpid()}"
            os.replace(final, old)
        os.replace(partial, final)
        _fsync_dir(root)
        _write_durably(os.path.join(root, LATEST), os.path.basename(final) + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# -- finding -----------------------------------------------------------------------------


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, META))


def latest(root: str) -> str | None:
    """The newest complete checkpoint under a ``checkpoints`` folder: the one ``LATEST``
    names; if that is missing or incomplete (a kill between two renames of a re-save),
    the highest ``step_N`` folder holding its ``meta.json``. ``None`` when there is none."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            candidate = os.path.join(root, f.read().strip())
        if _complete(candidate):
            return candidate
    if not os.path.isdir(root):
        return None
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(root)
        if (m := _STEP_DIR.match(name)) and _complete(os.path.join(root, name))
    )
    return os.path.join(root, steps[-1][1]) if steps else None


def resolve(path: str) -> str:
    """The checkpoint folder ``path`` names: a checkpoint itself, a ``checkpoints`` folder or
    a run folder (its newest complete checkpoint)."""
    if _complete(path):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"--resume {path!r}: no checkpoint there (expected a run folder with checkpoints/{LATEST}, "
        f"or a checkpoint folder with {META})"
    )


def read_meta(ckpt: str) -> dict[str, Any]:
    path = os.path.join(ckpt, META)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint's metadata ({exc})") from None


# -- verifying ---------------------------------------------------------------------------


def _read_manifest(ckpt: str) -> dict[str, dict[str, Any]] | None:
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: corrupted checkpoint manifest ({exc}); refusing to load {ckpt}"
        ) from None
    return files


def _check_files(ckpt: str, files: dict[str, dict[str, Any]]) -> list[str]:
    """Problems with this rank's share of the files: every rank checks presence and size
    of all of them (cheap) and the SHA-256 of its share."""
    problems = []
    for name, entry in files.items():
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing (the manifest lists it)")
        elif os.path.getsize(path) != entry["bytes"]:
            problems.append(
                f"{path}: {os.path.getsize(path)} bytes, the manifest says {entry['bytes']} "
                "(truncated or overwritten)"
            )
    if problems:
        return problems
    for name in sorted(files)[_rank() :: _world()]:
        path = os.path.join(ckpt, name)
        try:
            if _sha256(path) != files[name]["sha256"]:
                problems.append(f"{path}: SHA-256 differs from the manifest (corrupted)")
        except OSError as exc:  # reported like the rest: a rank raising alone would hang its peers
            problems.append(f"{path}: unreadable ({exc})")
    return problems


def verify(ckpt: str) -> dict[str, Any]:
    """Check ``ckpt`` against its manifest and return its meta; collective when a process
    group exists (every rank hashes a share and all learn the verdict).

    Raises :class:`CheckpointError` naming the first bad file, on every rank. A checkpoint
    written before manifests existed (no ``manifest`` key in its meta) loads with a warning.
    """
    files = _read_manifest(ckpt)
    if files is None:
        meta = read_meta(ckpt)
        if "manifest" in meta:
            raise CheckpointError(f"{os.path.join(ckpt, MANIFEST)}: missing; refusing to load {ckpt}")
        warnings.warn(f"{ckpt}: written without a manifest; its files cannot be verified", stacklevel=2)
        return meta
    problems = [p for part in _all_gather(_check_files(ckpt, files)) for p in part]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"refusing to load checkpoint {ckpt}: {problems[0]}{more}")
    return read_meta(ckpt)


def check_compatible(ckpt: str, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    """Refuse a checkpoint written for another model or optimizer, naming the mismatch.

    ``expect`` holds the live run's ``optimizer`` and ``model`` (a :func:`model_signature`);
    keys absent from an older checkpoint's meta are not compared.
    """
    if "optimizer" in meta and "optimizer" in expect and meta["optimizer"] != expect["optimizer"]:
        raise CheckpointError(
            f"{ckpt} holds {meta['optimizer']} optimizer state; "
            f"this run uses --optimizer {expect['optimizer']}"
        )
    saved, live = meta.get("model"), expect.get("model")
    if saved is None or live is None:
        return
    missing = [k for k in live if k not in saved]
    extra = [k for k in saved if k not in live]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"parameters not in the checkpoint: {missing[:5]}")
        if extra:
            parts.append(f"checkpoint parameters not in this model: {extra[:5]}")
        raise CheckpointError(f"{ckpt} is for a different model: {'; '.join(parts)}")
    for name, (shape, dtype) in live.items():
        if list(saved[name][0]) != list(shape) or saved[name][1] != dtype:
            raise CheckpointError(
                f"{ckpt} is for a different model: {name} has shape {tuple(saved[name][0])} "
                f"({saved[name][1]}) in the checkpoint, {tuple(shape)} ({dtype}) here"
            )


# -- loading -----------------------------------------------------------------------------


def load(
    ckpt: str,
    model: nn.Module,
    optimizer: Any,
    engine: Any,
    expect: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``ckpt``; returns its meta.

    Every rank must call it. Order: :func:`verify` (files), :func:`check_compatible`
    (against ``expect``), then the load. A :class:`CheckpointError` from the first two
    leaves every live object untouched.
    """
    meta = verify(ckpt)
    check_compatible(ckpt, meta, expect or {})
    fmt = meta.get("format")
    if fmt == "deepspeed":
        if engine is None:
            raise CheckpointError(f"{ckpt} is a DeepSpeed checkpoint; resume it with --backend deepspeed")
        engine.load_checkpoint(ckpt, tag="engine")
    elif fmt == "dcp":
        if engine is not None:
            raise CheckpointError(f"{ckpt} is a DCP checkpoint; DeepSpeed resumes only its own checkpoints")
        # Copies, not the model's own tensors: get_model_state_dict aliases the parameters,
        # and dcp.load fills tensors one by one, so a read failing half-way would leave a
        # half-loaded model. The copies go into the model only once everything was read.
        # One implementation for library and job: it reads into copies, so a read failing
        # half-way changes nothing live.
        try:
            sai_checkpoint.load(ckpt, model, optimizer)
        except sai_checkpoint.CheckpointReadError as exc:
            raise CheckpointError(str(exc)) from exc
    else:
        raise CheckpointError(f"{ckpt}: unknown checkpoint format {fmt!r}")
    rng_file = os.path.join(ckpt, "rng", f"rank{_rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
