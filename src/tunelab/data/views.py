"""Sequence views over a cached Arrow file: what the trainers index, memory-mapped.

:class:`ExampleView` behaves like the list of examples the trainers used to get (``len``,
``view[i]``, iteration) and returns the same :class:`Example`/:class:`PairExample`/
:class:`UnpairedExample`/:class:`PromptExample` objects, built on demand from the file; its
``lengths`` array (int32, 4 bytes per example) is all it keeps in memory.

Why the resident set stays flat: the file is memory-mapped, and pages of a mapping that have
been read count towards the process's resident memory until the kernel needs them back, so an
epoch over a 2 GB cache would show 2 GB more "RSS" although nothing was copied. The view
therefore tells the kernel to unmap what it has read (``madvise(MADV_DONTNEED)``) once an
estimate of the pages it touched passes :data:`RELEASE_BYTES`; the pages stay in the page
cache, and reading them again costs a minor page fault, not disk I/O. The mapping is also
marked ``MADV_RANDOM``: training reads examples in shuffled order, and without it every read
maps its neighbourhood too (read-ahead, fault-around: 64 KiB or more per read), which made a
random epoch over a 1M-example cache hold 1.3 GB of it (measured).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa

from tunelab.data.columns import PAYLOAD, Encoded, Kind, from_row

RELEASE_BYTES = 64 * 2**20
#: What one read of a list column may map, beyond the bytes it reads (a fault-around window).
_PER_READ = 64 * 2**10


class _Column:
    """One column of a chunked table as numpy arrays: per chunk, list offsets and values (lists of
    ids), or the values themselves (scalars); Python objects (strings) stay Arrow."""

    def __init__(self, chunks: list[pa.Array]):
        self.is_list = pa.types.is_list(chunks[0].type) if chunks else False
        self.offsets = [np.asarray(c.offsets) for c in chunks] if self.is_list else []
        self.values = [np.asarray(c.values) if self.is_list else _scalars(c) for c in chunks]

    def get(self, chunk: int, row: int) -> Any:
        if self.is_list:
            offsets = self.offsets[chunk]
            return self.values[chunk][offsets[row]:offsets[row + 1]].tolist()
        value = self.values[chunk][row]
        return value.as_py() if isinstance(value, pa.Scalar) else value.item()


def _scalars(chunk: pa.Array) -> Any:
    return chunk if pa.types.is_string(chunk.type) else chunk.to_numpy(zero_copy_only=False)


class ExampleView(Sequence[Encoded]):
    """The examples of one cache file (``train.arrow`` or ``eval.arrow``), read on demand."""

    def __init__(self, path: str | Path, kind: Kind):
        self.path, self.kind = Path(path), kind
        with open(self.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_RANDOM)
        batches = pa.ipc.open_stream(pa.py_buffer(self._map)).read_all().to_batches()  # zero-copy
        self._starts = np.cumsum([0] + [b.num_rows for b in batches])
        self._columns = {name: _Column([b.column(name) for b in batches]) for name in PAYLOAD[kind]}
        self._lists = sum(column.is_list for column in self._columns.values())
        self.lengths: np.ndarray = np.concatenate([np.zeros(0, dtype=np.int32)]
                                                  + [np.asarray(b.column("length")) for b in batches])
        self._read = 0

    def __len__(self) -> int:
        return int(self._starts[-1])

    @overload
    def __getitem__(self, index: int) -> Encoded: ...

    @overload
    def __getitem__(self, index: slice) -> list[Encoded]: ...

    def __getitem__(self, index: int | slice) -> Encoded | list[Encoded]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"example {index} of {size}")
        index %= size
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._example(chunk, index - int(self._starts[chunk]))

    def __iter__(self) -> Iterator[Encoded]:
        for chunk in range(len(self._starts) - 1):
            for row in range(int(self._starts[chunk + 1] - self._starts[chunk])):
                yield self._example(chunk, row)

    def _example(self, chunk: int, row: int) -> Encoded:
        example = from_row(self.kind, lambda name: self._columns[name].get(chunk, row))
        self._release_after(8 * int(self.lengths[int(self._starts[chunk]) + row]) + self._lists * _PER_READ)
        return example

    def _release_after(self, nbytes: int) -> None:
        """Count what reads may have mapped (ids and labels, 4 bytes a token, plus a fault-around window per
        list column read); past :data:`RELEASE_BYTES`, unmap it."""
        self._read += nbytes
        if self._read >= RELEASE_BYTES and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)
            self._read = 0

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its path: a worker process maps the file itself."""
        return ExampleView, (self.path, self.kind)

    def __repr__(self) -> str:
        return f"ExampleView({str(self.path)!r}, {self.kind!r}, {len(self)} examples)"
