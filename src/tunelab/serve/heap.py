"""The server process's C heap (glibc): few arenas, and freed memory handed back when idle.

Why: PyTorch's CPU tensors come from ``malloc``. glibc gives threads that allocate their own
arenas (up to eight per core) and the server has many threads (the generation worker, the
request thread pool), each arena keeping the KV caches and activations freed in it; and
glibc raises its mmap threshold with every large free, so big blocks stop going back to
the system. A server soaked with 192 requests (benchmarks/serve_soak.py) ended 127 MB
above its size after warm-up with only :func:`release_freed_memory`; with two arenas as
well, 15 MB. On other C libraries both functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import torch

_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def _load_glibc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_GLIBC = _load_glibc()


def limit_arenas(count: int = 2) -> None:
    """Let at most ``count`` malloc arenas exist; call before the server starts its threads."""
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_ARENA_MAX, count)


def release_freed_memory() -> None:
    """Give the memory freed by finished requests back to the system (cheap when little is free)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
