"""Memory probes: peak memory of this process or device, and the /proc and rusage readers behind it.

Training logs ``peak_memory_bytes`` per step, and the memory estimator measures framework
and child-process peaks with the same readers; both need the same numbers, so the probes
live here, below every layer that reports memory.
"""

from __future__ import annotations

import resource
import sys

import torch


def proc_kib_field_bytes(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a Linux /proc file (``/proc/meminfo``, ``/proc/self/status``)
    in bytes, or None where the file or the field does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def maxrss_bytes(maxrss: int) -> int:
    """``ru_maxrss`` in bytes: kilobytes on Linux, bytes on macOS."""
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM, which starts afresh in a new program. ``ru_maxrss`` survives ``exec``, so
    a run started from a large process (a notebook, a test runner) would report that
    process's size.
    """
    peak = proc_kib_field_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated bytes on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()
