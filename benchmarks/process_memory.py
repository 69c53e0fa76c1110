"""This process's memory as the kernel reports it, for the memory benchmarks (Linux).

One place for what seven_b.py, tight_memory.py and in_backward_memory.py all measure:
``/proc/self/status`` fields (``VmRSS``, ``VmHWM`` the peak resident set, ``VmData`` what
``RLIMIT_DATA`` counts), resetting the high-water mark between phases, and pinning glibc's
mmap threshold so freed tensors leave the resident set at once.
"""

from __future__ import annotations

import ctypes


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``status_kib("VmHWM")``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_hwm() -> None:
    """Reset ``VmHWM`` to the current resident set (``clear_refs`` 5), so the next reading
    is the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def pin_mmap_threshold() -> None:
    """Every buffer above 128 KiB its own mapping, returned to the kernel on free.

    glibc raises its mmap threshold dynamically after frees; pinned, the resident set (and
    the data segment a cap counts) follows what is alive."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass
