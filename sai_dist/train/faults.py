"""Fault injection for the job's reliability tests and the soak run: environment hooks
that SIGKILL a rank at a chosen point, as a crashed node or an OOM-killer would.

Off unless the variables are set; they fire only in a job's first attempt
(``TORCHELASTIC_RESTART_COUNT`` unset or 0), so the attempt torchrun restarts runs clean:

``SAI_DIST_TRAIN_DIE_AFTER_STEP=N``
    the rank dies right after step ``N`` (after its checkpoint, if step ``N`` saves one).
``SAI_DIST_TRAIN_DIE_IN_SAVE=N``
    the rank dies in the middle of saving the checkpoint of step ``N``: its own files are
    written to ``step_N.partial``, the other ranks' metadata, manifest and rename are not.
``SAI_DIST_TRAIN_HANG_AFTER_STEP=N`` / ``SAI_DIST_TRAIN_HANG_IN_SAVE=N``
    the same points, but the rank stops (sleeps) instead of dying, so a test can take its
    host down at a known moment: link first, then every process, as a host losing power.
``SAI_DIST_TRAIN_DIE_RANK=R``
    the rank that dies or hangs (default 0); a comma list (``2,3``) for a whole host.

SIGKILL, not an exception: nothing in the process gets to clean up, which is the case the
checkpoint format must survive.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist


def restart_count() -> int:
    """How many times torchelastic has restarted this job's workers (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _armed(variable: str, step: int) -> bool:
    value = os.environ.get(variable)
    if not value or int(value) != step or restart_count() != 0:
        return False
    rank = dist.get_rank() if dist.is_initialized() else 0
    chosen = os.environ.get("SAI_DIST_TRAIN_DIE_RANK", "0")
    return rank in {int(r) for r in chosen.split(",") if r.strip()}


def _die(what: str) -> None:
    print(f"[sai-dist train] fault injection: SIGKILL {what}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _hang(what: str) -> None:
    print(
        f"[sai-dist train] fault injection: rank {dist.get_rank() if dist.is_initialized() else 0} "
        f"hangs {what}",
        flush=True,
    )
    while True:
        time.sleep(3600)


def maybe_die_after_step(step: int) -> None:
    if _armed("SAI_DIST_TRAIN_DIE_AFTER_STEP", step):
        _die(f"after step {step}")
    if _armed("SAI_DIST_TRAIN_HANG_AFTER_STEP", step):
        _hang(f"after step {step}")


def maybe_die_in_save(step: int) -> None:
    if _armed("SAI_DIST_TRAIN_DIE_IN_SAVE", step):
        _die(f"while saving the checkpoint of step {step}")
    if _armed("SAI_DIST_TRAIN_HANG_IN_SAVE", step):
        _hang(f"while saving the checkpoint of step {step}")
