"""What a rank knows about its peers on other hosts: who is unreachable, and whether every
host runs the same job.

Unreachable peers. gloo reports a lost host only as "Timed out waiting 10000ms for recv
operation to complete", after the process-group timeout (``--pg-timeout``), naming neither
the peer nor the collective. So at start-up each rank opens a *probe* socket (listening,
never accepting: the kernel completes a TCP handshake into the backlog by itself) and the
ranks exchange ``(host address, probe port)``. When a collective fails, :func:`guard` dials
every peer's probe with a short timeout and raises one error naming the step, the
collective's failure, the time-out, and the ranks (with their addresses) that did not
answer: on each side of a network split, the ranks of the other side; after a host died,
its ranks.

Same job everywhere. :func:`check_same_config` gathers every rank's config and, when hosts
were started with different flags, raises on every rank naming each differing flag and
which ranks hold which value (training on would mix two runs or hang in mismatched
collectives).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch.distributed as dist

__all__ = ["PeerProbe", "Watch", "check_same_config", "guard"]

# Settings that may differ between hosts without changing the job: where the progress bar
# goes and the number of ranks to spawn when there is no launcher (unused under one).
LOCAL_ONLY = ("progress", "nproc")


def _route_address(towards: str) -> str:
    """This host's address on the route to ``towards`` (no packet is sent: a UDP connect
    only picks the source address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((towards, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class PeerProbe:
    """Every rank's ``(address, probe port)``; made collectively, after the process group."""

    def __init__(self, master_addr: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(64)
        self.rank = dist.get_rank()
        mine = (_route_address(master_addr), int(self.sock.getsockname()[1]))
        self.peers: list[tuple[str, int]] = [("", 0)] * dist.get_world_size()
        dist.all_gather_object(self.peers, mine)

    def unreachable(self, timeout_s: float = 2.0) -> tuple[list[str], list[str]]:
        """``(unreachable, gone)``: ``"rank R (addr)"`` of each peer whose host does not answer
        within ``timeout_s`` (dead, or across a split), and of each whose host answers but whose
        process has exited (connection refused)."""

        def dial(addr: str, port: int) -> str:
            try:
                with socket.create_connection((addr, port), timeout=timeout_s):
                    return "ok"
            except ConnectionRefusedError:
                return "gone"
            except OSError:
                return "lost"

        others = [r for r in range(len(self.peers)) if r != self.rank]
        # All at once: the whole probe takes one timeout, however many peers are lost.
        with ThreadPoolExecutor(max_workers=min(64, max(1, len(others)))) as pool:
            verdicts = list(pool.map(lambda r: dial(*self.peers[r]), others))
        lost = [
            f"rank {r} ({self.peers[r][0]})" for r, v in zip(others, verdicts, strict=True) if v == "lost"
        ]
        gone = [
            f"rank {r} ({self.peers[r][0]})" for r, v in zip(others, verdicts, strict=True) if v == "gone"
        ]
        return lost, gone

    def close(self) -> None:
        self.sock.close()


# How gloo, NCCL and the c10d store word a peer that stopped answering or vanished.
_COMM_WORDS = (
    "timed out",
    "timeout",
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "gloo",
    "nccl",
    "socket",
    "peer",
)


def _is_comm_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(w in text for w in _COMM_WORDS)


class Watch:
    """Where the job is (``where``, e.g. "step 7") and its probe, for :func:`guard`."""

    def __init__(self) -> None:
        self.probe: PeerProbe | None = None
        self.where = "start-up"
        self.pg_timeout = 0.0


@contextlib.contextmanager
def guard() -> Iterator[Watch]:
    """Re-raise a collective that failed inside the block as one ``RuntimeError`` naming
    where the job was, the unreachable peers and the time-out that bounded the wait. Without
    a probe (single process, or before the process group exists) errors pass unchanged."""
    watch = Watch()
    try:
        yield watch
    except (RuntimeError, dist.DistError) as exc:
        probe = watch.probe
        if probe is None or not _is_comm_failure(exc):
            raise
        lost, gone = probe.unreachable()
        me = f"rank {probe.rank} ({probe.peers[probe.rank][0]})"
        found = []
        if lost:
            found.append(f"unreachable (host dead or network split): {', '.join(lost)}")
        if gone:
            found.append(f"exited: {', '.join(gone)}")
        peers = "; ".join(found) or "every peer still answers (a peer process is stuck or failed)"
        raise RuntimeError(
            f"[sai-dist train] {me}: a collective failed in {watch.where}; {peers}. "
            f"The wait was bounded by --pg-timeout {watch.pg_timeout:g} s. Cause: {exc}"
        ) from exc
    finally:
        if watch.probe is not None:
            watch.probe.close()


def check_same_config(config: dict[str, Any]) -> None:
    """Raise on every rank when ranks were started with different job settings."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = {k: v for k, v in config.items() if k not in LOCAL_ONLY}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    problems = []
    for key in sorted({k for c in every for k in c}):
        values: dict[str, list[int]] = {}
        for r, c in enumerate(every):
            values.setdefault(repr(c.get(key)), []).append(r)
        if len(values) > 1:
            held = "; ".join(f"{v} on ranks {','.join(map(str, ranks))}" for v, ranks in values.items())
            problems.append(f"--{key.replace('_', '-')}: {held}")
    if problems:
        raise ValueError(
            "the hosts of this job were started with different sai-dist settings (run the same "
            "command, or the same --resume, on every host): " + " | ".join(problems)
        )
