"""Stopping a launcher and every process under it.

torchrun (and the job's own ``--nproc`` spawner) may give each worker a session of its own,
so killing the launcher's process group can orphan its workers. The helpers here find
workers through ``/proc/<pid>/task/*/children`` and stop them by pid; tests and benchmarks
that launch the job use them so no rank outlives its run.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

__all__ = ["descendants", "kill_all", "wait_tree"]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...); empty off Linux or
    once ``pid`` has exited."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def kill_all(proc: subprocess.Popen, extra: Iterable[int] = ()) -> None:
    """SIGKILL ``extra`` pids, every descendant of ``proc`` and its process group; pids
    already gone are skipped."""
    for pid in {*extra, *descendants(proc.pid)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_tree(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for ``proc`` (started with ``start_new_session=True`` and text stdout) and
    return ``(exit status, output)``. On time-out, ask it to stop (SIGTERM lets a torchrun
    agent stop its workers), then raise ``AssertionError`` with the output's tail. Either
    way, nothing it started survives."""
    tree: list[int] = []
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        tree = descendants(proc.pid)  # before the agent exits and its workers are reparented
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = ""
        raise AssertionError(f"{proc.args} timed out after {timeout} s:\n{(out or '')[-4000:]}") from None
    finally:
        kill_all(proc, tree)
