"""Atomic file writes: a crash never leaves a half-written file behind.

Every finished artefact (configs, metrics snapshots, checkpoints, predictions) is written
to a temporary file in the same directory, fsynced, then renamed over the target.
Directories (checkpoints) are written to a temporary sibling and renamed into place.
Files that a library writes several at a time into a directory that holds other things
(a tokenizer's files in a run directory) are written into a staging directory and then
renamed into place one by one (:func:`atomic_files`).

Every temporary is named ``.TARGET.<random>.tmp`` beside its target (and a directory being
replaced is parked as ``.TARGET.old``), so a crash leaves only names that
:func:`temporary_target` recognises: whoever owns the directory can clean them up without
touching anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")
_PARKED = re.compile(r"^\.(?P<target>.+)\.old$")


def temporary_target(name: str) -> tuple[str, bool] | None:
    """``(target, parked)`` when ``name`` is a temporary this module (or a caller following its
    naming, like ``.step-3.pruned.tmp``) creates for ``target``; None for any other name.

    ``parked`` is true for ``.TARGET.old``: the previous copy of a directory that
    :func:`atomic_dir` moved aside and would have deleted once the new one was in place.
    """
    for pattern, parked in ((_TEMPORARY, False), (_PARKED, True)):
        match = pattern.match(name)
        if match:
            return match.group("target"), parked
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Any) -> None:
    with atomic_open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` in one rename.

    If ``path`` already exists it is moved aside first and removed only after the new
    directory is in place, so at every instant one complete copy exists.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_files(directory: str | os.PathLike, staging: str) -> Iterator[Path]:
    """Yield an empty staging directory; on success move each file in it into ``directory``.

    For a writer that puts several files into a directory holding other things (a
    tokenizer's ``save_pretrained`` into a run directory): each file is complete and
    fsynced before one rename puts it in place, so at every instant each file of that name
    is either the old complete one, absent, or the new complete one; never cut short. The
    staging directory is ``directory/.STAGING.<random>.tmp``. The writer must write plain
    files only (no subdirectories).
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{staging}.", suffix=".tmp", dir=target))
    try:
        yield tmp
        files = sorted(tmp.iterdir())
        nested = [path.name for path in files if not path.is_file()]
        if nested:
            raise ValueError(f"atomic_files moves plain files only; the writer made {nested} in {tmp}")
        for file in files:
            _fsync_file(file)
        for file in files:
            os.replace(file, target / file.name)
        _fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
