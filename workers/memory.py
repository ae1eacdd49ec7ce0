"""The memory a task itself needed: Linux's peak resident set (VmHWM) reset when the task starts.

A pool process lives for many tasks, so its lifetime peak (``ru_maxrss``) says more about the
largest task it ever ran than about this one. Writing ``5`` to ``/proc/self/clear_refs`` resets
the peak (Linux >= 4.0); where that is refused the lifetime peak is reported instead, which is
still an upper bound.
"""

from __future__ import annotations

import contextlib
import resource


def reset_peak_rss() -> bool:
    """Start measuring the peak from now; False where the kernel refuses (then: lifetime)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    return False


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return kib / 1024


def current_rss_mb() -> float:
    kib = _status_kib("VmRSS")
    return (kib or 0) / 1024
