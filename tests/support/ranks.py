"""Run a function on N local gloo ranks (127.0.0.1, a free port per launch, bounded time).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, each of which sets up
a gloo process group on 127.0.0.1 and calls ``fn(rank, world_size, *args)``; it returns
the list of per-rank return values (which must pickle), re-raises the first rank's
exception with its traceback, and kills every process on timeout.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from sai_dist.train.distributed import free_port

DEFAULT_TIMEOUT_S = 240.0


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Keep the 2-core machine from oversubscribing with intra-op threads.
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}"
        )
        result = fn(rank, world_size, *args)
        # By value (plain pickle): torch's queue pickler would share a CPU tensor through a
        # file descriptor that the parent fetches from this process later, which fails
        # whenever this process has already exited by then.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; see module doc."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        import queue as queue_mod
        import time

        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world_size}-rank run of {fn.__name__} exceeded {timeout:.0f} s")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    # A rank died without reporting (segfault, os._exit): give peers a moment.
                    time.sleep(2)
                    if len(results) + len(errors) < world_size and queue.empty():
                        codes = [p.exitcode for p in procs]
                        raise RuntimeError(
                            f"rank process died without a result, exit codes {codes}"
                        ) from None
                if errors:
                    # Peers of a failed rank usually hang in a collective; do not wait for them.
                    break
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
