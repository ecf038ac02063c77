"""The server process's C heap (glibc): few arenas, large blocks unmapped, memory handed back when idle.

Why: PyTorch's CPU tensors come from ``malloc``. glibc gives threads that allocate their own
arenas (up to eight per core; the server has a generation worker and a request thread
pool), each keeping what was freed in it, and raises its mmap threshold with every large
free, so freed KV caches and activations stay in the heaps. Soaked with 192 requests
(benchmarks/serve_soak.py, SmolLM2), a server that trimmed its heaps when idle ended 127 MB
above its size after warm-up, 302 MB when also limited to two arenas, and 12 MB with the
fixed mmap threshold as well. On other C libraries these functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import torch

# mallopt parameters (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Blocks from this size up are mapped on their own and unmapped when freed (a fixed threshold
#: also stops glibc from raising it after each large free).
MMAP_THRESHOLD = 256 * 1024


def _load_glibc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_GLIBC = _load_glibc()


def configure_heap(arenas: int = 2) -> None:
    """At most ``arenas`` malloc arenas, and large blocks returned when freed; call before the
    server loads its model and starts its threads."""
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_ARENA_MAX, arenas)
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_freed_memory() -> None:
    """Give the memory freed by finished requests back to the system (cheap when little is free)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
