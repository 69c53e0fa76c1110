"""DeepSpeed's CPU all-reduce workspace in ``/dev/shm``, which DeepSpeed never releases."""

from __future__ import annotations

import os

__all__ = ["SHM_DIR", "release_shm_workspace", "shm_workspace_path"]

#: Where DeepSpeed's CPU communication op keeps each rank's all-reduce workspace.
SHM_DIR = "/dev/shm"


def shm_workspace_path(rank: int, env: dict[str, str] | None = None) -> str:
    """The POSIX shared-memory file DeepSpeed's CPU all-reduce op makes for ``rank``.

    ``ShareMemCommBuilder`` (built when ``deepspeed.comm`` starts on CPU) creates, when every
    rank is on one host, one segment per rank named
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (about 67 MB),
    keyed on the launch's rendezvous address, so two launches never share a name.
    """
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_workspace(rank: int) -> bool:
    """Unlink this rank's DeepSpeed shared-memory workspace; ``True`` if there was one.

    DeepSpeed never unlinks it, and ``/dev/shm`` is RAM: every multi-rank CPU run would leave
    ~67 MB per rank behind until reboot. Call it once this rank's last collective is done
    (after ``destroy_process_group``); peers that still hold the segment mapped keep it
    until they exit, and nothing opens it by name after start-up.
    """
    try:
        os.unlink(shm_workspace_path(rank))
    except FileNotFoundError:
        return False
    return True
