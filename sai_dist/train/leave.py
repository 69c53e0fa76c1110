"""How a finished training process ends: its communicators torn down while the interpreter
is whole, then an exit that skips interpreter finalization.

A rank that has finished (checkpoints, metrics and reports written and closed, the process
group destroyed) has nothing left to do, but Python's finalization still destroys whatever
C++ communication objects remain (gloo's contexts and their I/O threads, stores) in an order
nobody controls. On CI one rank of a completed multi-host run aborted there
(``terminate called without an active exception``, SIGABRT), and torchrun then reported the
whole finished run as failed. So the worker entry point ends the way multiprocessing's own
workers do: it flushes what is buffered, finalizes MPI if mpi4py started it, and calls
``os._exit`` with the job's status. Errors are not routed here: an exception still unwinds
normally, with its traceback and torchelastic's error record.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import NoReturn

import torch.distributed as dist

__all__ = ["exit_now", "tear_down"]


def tear_down() -> None:
    """Leave the process group together and destroy it: a barrier so no rank closes its
    connections while a peer still finishes the last collective, then a collection so that
    objects still referring to the group (modules, meshes, optimizer layouts in reference
    cycles) are freed now rather than during finalization, then ``destroy_process_group``."""
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` after flushing stdout, stderr and logging, and
    finalizing MPI when mpi4py initialized it (mpiexec counts a rank that skips
    ``MPI_Finalize`` as failed); interpreter finalization is skipped (module docstring)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader is gone: nothing left to lose
            pass
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
