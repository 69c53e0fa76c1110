"""Hosts for multi-host tests: Linux network namespaces joined by one switch.

``Cluster(n)`` creates ``n`` hosts ``<tag>-h0 .. <tag>-h{n-1}`` and a switch namespace
``<tag>-sw`` holding a bridge. Host ``i`` has one interface ``eth0`` with address
``10.77.0.{i+1}/24`` (a veth pair whose other end, ``p{i}``, is a port of the bridge) and
its own loopback. Nothing is added to the machine's own network namespace: every address
and link lives inside the namespaces made here, so the traffic of a test can only go between
its hosts, and two clusters (two test sessions) cannot see each other.

What a test does with a host:

* :meth:`Cluster.popen` starts a command on it (``ip netns exec``), in a session of its own;
* :meth:`Cluster.cut` / :meth:`Cluster.restore` take its switch port down / up: the host's
  processes live on, their packets are dropped, TCP peers see silence, not a reset (a
  network split or a pulled cable);
* :meth:`Cluster.kill_host` SIGKILLs every process in the namespace at once (a host that
  loses power; nothing gets to say goodbye).

Clean-up (:meth:`Cluster.close`) kills every process of every host and deletes the
namespaces (which deletes their links). It runs from the fixture's finaliser, from
``atexit`` and on SIGTERM/SIGINT/SIGHUP, and is idempotent. Namespaces left by a session
that was SIGKILLed (its pid is in the tag) are removed by the next one.

:func:`unavailable` says why the machine cannot make hosts (not root, no ``ip``, no netns
support); tests skip with that reason.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

SUBNET = "10.77.0"
PREFIX = "saimh"  # every namespace made here starts with it: saimh<pid>x<n>-h0 ...
IFACE = "eth0"
_live: list[Cluster] = []
_counter = 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why network-namespace hosts cannot be made here, or ``None`` when they can."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed; scripts/setup.sh installs it when run as root"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        if veth.returncode != 0:
            return f"veth links cannot be made in a network namespace: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _sweep_stale() -> None:
    """Delete namespaces of earlier sessions whose process is gone (a SIGKILLed pytest)."""
    listing = _ip("netns", "list", check=False).stdout.split()
    for name in listing:
        if not name.startswith(PREFIX):
            continue
        digits = name[len(PREFIX) :].split("x")[0].split("probe")[0]
        if digits.isdigit() and not os.path.exists(f"/proc/{digits}"):
            _kill_namespace(name)
            _ip("netns", "del", name, check=False)


def _pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def _kill_namespace(ns: str) -> int:
    """SIGKILL every process in ``ns`` until none is left; returns how many were killed."""
    killed: set[int] = set()
    for _ in range(50):
        pids = [p for p in _pids(ns) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return len(killed)


class Cluster:
    """``n`` hosts on one switch; see the module docstring."""

    def __init__(self, n: int) -> None:
        global _counter
        if not 1 <= n <= 200:
            raise ValueError(f"Cluster(n={n}): 1..200 hosts")
        _sweep_stale()
        _counter += 1
        self.tag = f"{PREFIX}{os.getpid()}x{_counter}"
        self.switch = f"{self.tag}-sw"
        self.hosts = [f"{self.tag}-h{i}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        _install_handlers()
        _live.append(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (host, addr) in enumerate(zip(self.hosts, self.addrs, strict=True)):
            _ip("netns", "add", host)
            # Both ends are made inside namespaces: nothing appears in the machine's own.
            _ip(
                "-n",
                host,
                "link",
                "add",
                IFACE,
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                self.switch,
            )
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            _ip("-n", host, "addr", "add", f"{addr}/24", "dev", IFACE)
            _ip("-n", host, "link", "set", IFACE, "up")
            _ip("-n", host, "link", "set", "lo", "up")

    # -- using hosts ----------------------------------------------------------------

    def exec_prefix(self, host: int) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host]]

    def popen(self, host: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` on ``host`` (own session; stdout+stderr captured as text unless
        ``kwargs`` says otherwise). The process is killed at :meth:`close`."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        kwargs.setdefault("text", True)
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen([*self.exec_prefix(host), *cmd], **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: int, cmd: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.exec_prefix(host), *cmd], capture_output=True, text=True, timeout=timeout, check=False
        )

    def pids(self, host: int) -> list[int]:
        return _pids(self.hosts[host])

    def cut(self, host: int) -> None:
        """Take the host's switch port down: its packets go nowhere, its processes live on."""
        _ip("-n", self.switch, "link", "set", f"p{host}", "down")

    def restore(self, host: int) -> None:
        _ip("-n", self.switch, "link", "set", f"p{host}", "up")

    def kill_host(self, host: int) -> int:
        """SIGKILL everything running on ``host`` at once; returns how many processes."""
        return _kill_namespace(self.hosts[host])

    # -- clean-up -------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in self.hosts:
            _kill_namespace(ns)
        for proc in self._procs:
            # `ip netns exec` itself is in the root namespace's process list only as the
            # parent it was; reap it so no zombie is left.
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in [*self.hosts, self.switch]:
            _ip("netns", "del", ns, check=False)
        if self in _live:
            _live.remove(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_all() -> None:
    for cluster in list(_live):
        cluster.close()


_handlers_installed = False


def _install_handlers() -> None:
    """Clean up at interpreter exit and on the signals a CI runner or a user sends."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(close_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            close_all()
            if callable(previous):
                previous(signum, frame)
            else:
                raise SystemExit(128 + signum)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: atexit still cleans up
            pass
