"""The process's C heap (glibc): how freed tensor memory goes back to the system.

Why: PyTorch's CPU tensors come from ``malloc``. glibc serves large blocks with ``mmap`` and
unmaps them on free, but it raises that threshold with every large free (up to 32 MiB),
so freed activations soon stay in its heaps, where a block of a new size often cannot
reuse them; threads that allocate get arenas of their own (up to eight per core), each
keeping what was freed in it. Resident memory then exceeds the live tensors by an amount
no estimate can promise.

Measured (SmolLM2-135M LoRA, length 512, micro-batch 8, checkpointing, 6 steps; the
estimator predicts 1.31 GiB of live tensors): glibc's dynamic threshold peaked at
2.23 GiB, a fixed 4 MiB one at 1.59 GiB, a fixed 1 MiB one at 1.26 GiB, at 0.65x the
tokens/s (every new block faults its pages in again). With 8 of SmolLM2's layers and one
long sequence per step, the dynamic heap grew 1.17 -> 1.63 -> 2.36 GiB from 4k to 8k to 16k
tokens, the fixed 4 MiB one 0.86 -> 1.02 -> 1.26 GiB, linear, for 9% more time at 16k; the
whole model with the compact heap grows linearly to 32k tokens (benchmarks/long_context.py).

Soaked with 192 requests (benchmarks/serve_soak.py, SmolLM2), a server that trimmed its
heaps when idle ended 127 MB above its size after warm-up, 302 MB when also limited to two
arenas, and 12 MB with the fixed mmap threshold as well.

On other C libraries these functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import torch

# mallopt parameters (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: The server's threshold: blocks from this size up are mapped on their own and unmapped when
#: freed (a fixed threshold also stops glibc from raising it after each large free).
SERVER_MMAP_THRESHOLD = 256 * 1024
#: A compact training heap's threshold: activations of a few rows and up are returned when freed.
TRAINING_MMAP_THRESHOLD = 1024 * 1024


def _load_glibc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_GLIBC = _load_glibc()


def configure_heap(arenas: int = 2) -> None:
    """The server's heap: at most ``arenas`` malloc arenas, and large blocks returned when
    freed; call before the server loads its model and starts its threads."""
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_ARENA_MAX, arenas)
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, SERVER_MMAP_THRESHOLD)


def compact_heap() -> bool:
    """Return every freed block of :data:`TRAINING_MMAP_THRESHOLD` bytes or more to the system,
    so resident memory follows the live tensors; False where the C library is not glibc."""
    return _GLIBC is not None and bool(_GLIBC.mallopt(_M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD))


def release_freed_memory() -> None:
    """Give the memory freed by finished requests back to the system (cheap when little is free)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
