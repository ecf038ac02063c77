"""Dataset sources -> Arrow tables of raw rows, read by Hugging Face ``datasets``.

A :class:`Source` is one thing ``datasets`` reads: a data file, a directory written by
``save_to_disk``, or a hub split. :meth:`Source.table` loads it as a memory-mapped
``datasets.Dataset`` (:meth:`Source.iterable` as an ``IterableDataset`` for streaming), and
its :class:`RowFormat` turns batches of that table back into :class:`RawRow`s for
:mod:`tunelab.data.formats`, with the line or record index every error message names.

Which ``datasets`` builder reads what, and why:

* jsonl, txt (and .json files holding JSON lines): the ``text`` builder, one row per line,
  so row ``i`` is line ``i + 1`` exactly; the JSON is parsed later, in the parallel map, where
  a broken line is reported with its number. Parsing there also means a field whose type
  changes between records (a string here, a list there) is no problem.
* .json documents (a list of records): the ``json`` builder; csv: the ``csv`` builder with
  every cell kept a string (as Python's csv module gives them); parquet, arrow: their builders.
  Rows are typed Arrow; a csv row's line (quoted cells may span lines) is found by scanning
  the file only when a message needs it.
* Anything a builder rejects is read again by :func:`tunelab.data.sources.read_rows`: if the
  file is damaged, that names the line (invalid UTF-8, broken JSON, a truncated parquet file);
  if not, its rows are stored as JSON text and read the same way (the ``json_rows`` format).
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab.data.hub import HubSource, hub_dataset, hub_iterable, quiet_datasets
from tunelab.data.sources import (DatasetSpec, RawRow, as_row, dataset_files, is_saved_dataset, parse_json_line,
                                  read_rows, saved_dataset, typed_rows)
from tunelab.errors import DataError

RowKind = Literal["json_lines", "text_lines", "table", "json_rows"]
_csv_lines: dict[str, list[int | None]] = {}  # per process: csv file -> start line of every row


@dataclass(frozen=True)
class RowFormat:
    """How the rows of one source table become :class:`RawRow` objects (picklable: map workers get it)."""

    kind: RowKind
    file: str  # how the source is named in messages
    csv: bool = False  # table rows of a csv file: their start lines are found by scanning on demand

    def decode(self, batch: Mapping[str, list], indices: Sequence[int]) -> list[RawRow | None]:
        """The rows of a batch (``indices``: their positions in the source); None for a blank line.

        A line that is not JSON, or JSON that is not an object, raises :class:`DataError` whatever
        ``data.on_error`` says: such damage is in the file, not in one record's fields.
        """
        if self.kind == "json_lines":
            return [None if not text.strip() else
                    as_row(parse_json_line(text, self.file, i + 1), self.file, i + 1, i)
                    for text, i in zip(batch["text"], indices)]
        if self.kind == "text_lines":
            return [RawRow({"text": text}, self.file, i + 1, i) if text.strip() else None
                    for text, i in zip(batch["text"], indices)]
        if self.kind == "json_rows":
            return [as_row(json.loads(text), self.file, line, i)
                    for text, line, i in zip(batch["json"], batch["line"], indices)]
        return list(typed_rows(batch, indices, self.file))

    def line_of(self, index: int) -> int | None:
        """The line a row starts on, where the table does not record it (csv); else None."""
        if not self.csv:
            return None
        if self.file not in _csv_lines:
            _csv_lines[self.file] = [row.line for row in read_rows(self.file)]
        lines = _csv_lines[self.file]
        return lines[index] if index < len(lines) else None


@dataclass(frozen=True)
class Source:
    """One thing ``datasets`` reads: a data file, a saved dataset directory, or a hub split."""

    path: Path | None = None
    hub: HubSource | None = None
    split: str = "train"

    @property
    def label(self) -> str:
        return self.hub.label if self.hub else str(self.path)

    def table(self, work: Path) -> tuple[Any, RowFormat]:
        """The rows as a memory-mapped ``datasets.Dataset``; ``work`` holds what ``datasets`` writes for
        local files (the caller removes it)."""
        if self.hub is not None:
            return hub_dataset(self.hub), RowFormat("table", self.label)
        assert self.path is not None
        if is_saved_dataset(self.path):
            return saved_dataset(self.path, self.split), RowFormat("table", self.label)
        builder, options, row_format = _builder(self.path)
        try:
            table = quiet_datasets().load_dataset(builder, data_files=str(self.path), split="train",
                                             cache_dir=str(work / "hf"), **options)
        except Exception:  # builders raise many types; the file itself is examined instead
            return _reread(self.path, work), RowFormat("json_rows", self.label)
        return table, row_format

    def iterable(self) -> tuple[Any, RowFormat]:
        """The rows as a ``datasets.IterableDataset`` (streaming: nothing is materialised)."""
        if self.hub is not None:
            return hub_iterable(self.hub), RowFormat("table", self.label)
        assert self.path is not None
        if is_saved_dataset(self.path):
            return saved_dataset(self.path, self.split).to_iterable_dataset(), RowFormat("table", self.label)
        builder, options, row_format = _builder(self.path)
        return (quiet_datasets().load_dataset(builder, data_files=str(self.path), split="train", streaming=True,
                                         **options), row_format)

    def fingerprint(self) -> list[Any]:
        """What identifies the content: path, size and modification time of every file, or the hub
        split's ``datasets`` fingerprint (which changes with the dataset's revision)."""
        if self.hub is not None:
            return ["hub", self.hub.repo, self.hub.subset, self.hub.split, self.hub.data_dir,
                    hub_dataset(self.hub)._fingerprint]
        assert self.path is not None
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        return ["files", self.split] + [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]

    def failure(self, err: Exception) -> DataError:
        """What to tell the user when ``datasets`` failed while reading this source."""
        damage = file_damage(self.path) if self.path is not None and self.path.is_file() else None
        return damage or DataError(f"cannot read the dataset: {type(err).__name__}: {err}", file=self.label,
                                   hint="Check that it is complete and in the format its extension says.")


def sources_of(spec: DatasetSpec) -> list[Source]:
    """Every source of a dataset, in order (the files of a directory sorted by name)."""
    if spec.hub is not None:
        return [Source(hub=spec.hub, split=spec.split)]
    sources = []
    for path in spec.files:
        files = [path] if is_saved_dataset(path) else dataset_files(path)
        sources += [Source(path=file, split=spec.split) for file in files]
    return sources


def file_damage(path: Path) -> DataError | None:
    """The damage :func:`read_rows` finds in a file (invalid UTF-8, broken JSON, a truncated parquet
    file, ...), named by line or record; None when it reads the file without complaint."""
    try:
        for _ in read_rows(path):
            pass
    except DataError as found:
        return found
    return None


def _json_holds_lines(path: Path) -> bool:
    """A .json file whose first line is a whole JSON object holds JSON lines."""
    with path.open("rb") as handle:
        first = handle.readline().removeprefix(codecs.BOM_UTF8)
        while first and not first.strip():
            first = handle.readline()
    if not first.lstrip().startswith(b"{"):
        return False
    try:
        json.loads(first)
    except ValueError:
        return False
    return True


def _builder(path: Path) -> tuple[str, dict[str, Any], RowFormat]:
    """The ``datasets`` builder, its options, and the row format for a data file."""
    label = str(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "text", {"encoding": "utf-8-sig"}, RowFormat("text_lines", label)
    if suffix == ".jsonl" or (suffix == ".json" and _json_holds_lines(path)):
        return "text", {"encoding": "utf-8-sig"}, RowFormat("json_lines", label)
    if suffix == ".csv":
        return ("csv", {"features": _string_columns(path), "keep_default_na": False, "na_filter": False,
                        "encoding": "utf-8-sig"}, RowFormat("table", label, csv=True))
    return suffix.lstrip("."), {}, RowFormat("table", label)  # json (a document), parquet, arrow


def _string_columns(path: Path) -> Any:
    """Every column of a csv file typed string: cells stay text, as Python's csv module reads them (pandas
    would turn a column of numbers into numbers, and an answer "4" into 4)."""
    datasets = quiet_datasets()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (UnicodeDecodeError, csv.Error):
        header = []  # the builder fails on it too, and the file is then examined line by line
    return datasets.Features({name: datasets.Value("string") for name in header}) if header else None


def _json_rows(path: str) -> Iterator[dict[str, Any]]:
    for row in read_rows(path):
        yield {"json": json.dumps(row.data, ensure_ascii=False), "line": row.line}


def _reread(path: Path, work: Path) -> Any:
    """Rows of a file a builder rejected: the file's damage as an error, else its rows as JSON text."""
    damage = file_damage(path)
    if damage is not None:
        raise damage
    datasets = quiet_datasets()
    features = datasets.Features({"json": datasets.Value("string"), "line": datasets.Value("int64")})
    return datasets.Dataset.from_generator(_json_rows, gen_kwargs={"path": str(path)}, features=features,
                                           cache_dir=str(work / "hf"))
