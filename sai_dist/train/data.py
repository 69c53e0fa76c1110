"""An offline byte-level corpus: the Python standard library's own source files.

Every machine with Python has it, so the job needs no download. Files are read in sorted
order (deterministic), concatenated as raw bytes up to ``max_bytes``, and split **by file**:
every ``val_every``-th file is held out for validation, so validation text is never seen in
training.

Batches are a pure function of ``(seed, step)``: the windows of step ``s`` are drawn by a
generator seeded from ``(seed, s)``, the global batch is drawn once and rank ``r`` takes
rows ``[r*b, (r+1)*b)``. So a resumed run sees exactly the batches the uninterrupted run
would have seen, without saving any data-loader state, and the global batch is the same
whatever the number of ranks.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass

import torch
from torch import Tensor

SEPARATOR = b"\n\n"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


@dataclass
class Corpus:
    """Training and validation byte streams (uint8 tensors) and where they came from."""

    train: Tensor
    val: Tensor
    source: str
    n_files: int

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "files": self.n_files,
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
        }


def load_corpus(root: str | None = None, max_bytes: int = 4 << 20, val_every: int = 20) -> Corpus:
    """Read ``root/*.py`` (default: this interpreter's standard library) in sorted order.

    Stops after ``max_bytes`` bytes in total; file ``i`` (0-based, in sorted order) goes to
    validation when ``i % val_every == val_every - 1``.
    """
    root = root or stdlib_dir()
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2, got {val_every}")
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise FileNotFoundError(f"no *.py files under {root!r} to train on")
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    total = 0
    used = 0
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            data = f.read()
        data = data[: max(0, max_bytes - total)]
        if not data:
            break
        (val_parts if i % val_every == val_every - 1 else train_parts).append(data + SEPARATOR)
        total += len(data)
        used += 1
    if not train_parts or not val_parts:
        raise ValueError(
            f"corpus of {used} files from {root!r} (max_bytes={max_bytes}) leaves no "
            f"{'training' if not train_parts else 'validation'} file: raise max_bytes or lower val_every "
            f"(file i is held out when i % {val_every} == {val_every - 1})"
        )
    train = torch.frombuffer(bytearray(b"".join(train_parts)), dtype=torch.uint8)
    val = torch.frombuffer(bytearray(b"".join(val_parts)), dtype=torch.uint8)
    return Corpus(train=train, val=val, source=root, n_files=used)


def _windows(stream: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = stream[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def _generator(seed: int, step: int, salt: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, step, purpose).
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4 + salt)


def train_batch(
    corpus: Corpus, seed: int, step: int, global_batch: int, seq_len: int, rank: int, world_size: int
) -> tuple[Tensor, Tensor]:
    """Inputs and targets ``(b, seq_len)`` of step ``step`` for ``rank``; ``b = global_batch //
    world_size``."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    n = corpus.train.numel() - seq_len - 1
    if n <= 0:
        raise ValueError(f"training stream of {corpus.train.numel()} bytes is shorter than seq_len={seq_len}")
    starts = torch.randint(0, n, (global_batch,), generator=_generator(seed, step, 1))
    b = global_batch // world_size
    return _windows(corpus.train, starts[rank * b : (rank + 1) * b], seq_len)


def val_batches(
    corpus: Corpus, seed: int, n_batches: int, global_batch: int, seq_len: int, rank: int, world_size: int
) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set (the same at every evaluation), this rank's share."""
    n = corpus.val.numel() - seq_len - 1
    if n <= 0:
        raise ValueError(f"validation stream of {corpus.val.numel()} bytes is shorter than seq_len={seq_len}")
    b = global_batch // world_size
    out = []
    for i in range(n_batches):
        starts = torch.randint(0, n, (global_batch,), generator=_generator(seed, i, 2))
        out.append(_windows(corpus.val, starts[rank * b : (rank + 1) * b], seq_len))
    return out
