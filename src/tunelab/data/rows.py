"""Raw rows -> tokenized examples: the work done for every row, in map workers and in streams.

:class:`RowEncoder` is the function ``datasets.map`` runs in each worker process (and that a
stream calls on its windows): decode the source's rows, convert them to records with
:mod:`tunelab.data.formats`, check their size, and tokenize them with
:mod:`tunelab.data.tokenize`. It keeps one output row per input row, with a ``status``
(blank line, record, or skipped record and why), so that everything decided per *record*
afterwards (``max_samples``, mixing, the eval split) sees the same records the in-memory
pipeline saw.

Error policy, unchanged from the in-memory pipeline: damage in the file (invalid UTF-8 or
JSON, a non-object record) always raises; a record whose fields cannot be converted raises,
or with ``data.on_error=skip`` is counted with its reason; tokenization problems (a template
that rejects a conversation, data of the wrong kind for the stage) always raise. In a map
worker a raised error is also written to ``abort_file``, which the other workers check before
each batch: the first bad record stops the whole map in seconds, not after every other worker
has finished its share.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tunelab.config import RunConfig
from tunelab.data.columns import KIND_OF_STAGE, PAYLOAD, Encoded, Kind, example_length, to_row
from tunelab.data.formats import to_records
from tunelab.data.records import Record
from tunelab.data.sources import DatasetSpec, RawRow
from tunelab.data.tables import RowFormat
from tunelab.data.templates import ChatTemplate
from tunelab.data.tokenize import encode_records
from tunelab.errors import ConfigError, DataError

BLANK, RECORD, SKIPPED = 0, 1, 2
# A record longer than this many characters per token of data.max_length (or 4 Mi characters, if
# more) is refused: at most max_length tokens of it can train (about 4 characters each), and
# tokenizing tens of megabytes in one piece takes minutes and gigabytes.
CHARS_PER_CONTEXT_TOKEN = 64
MIN_RECORD_LIMIT = 4 * 2**20
META: dict[str, pa.DataType] = {"status": pa.int8(), "reason": pa.string(), "tokens": pa.int64(),
                                "supervised": pa.int64(), "cut": pa.bool_(), "length": pa.int32()}


def record_limit(max_length: int) -> int:
    """Most characters one record may hold."""
    return max(MIN_RECORD_LIMIT, CHARS_PER_CONTEXT_TOKEN * max_length)


@dataclass(frozen=True)
class EncodeSettings:
    """What decides how a record is tokenized (from ``cfg``): part of the cache key."""

    stage: str
    max_length: int
    train_on_prompt: bool = False
    mask_history: bool = False
    on_error: str = "raise"

    @classmethod
    def of(cls, cfg: RunConfig) -> "EncodeSettings":
        data = cfg.data
        return cls(cfg.stage, data.max_length, data.train_on_prompt, data.mask_history, data.on_error)

    @property
    def kind(self) -> Kind:
        """pt rows hold whole documents: packing them into blocks happens after mixing and the split."""
        if self.stage not in KIND_OF_STAGE:
            raise ConfigError(f"stage '{self.stage}' does not train on tokenized examples of a known kind; "
                              f"the data pipeline serves {', '.join(KIND_OF_STAGE)}.")
        return "document" if self.stage == "pt" else KIND_OF_STAGE[self.stage]


@dataclass
class RowResult:
    """What one row became. ``item`` is None for a record that cannot train (dropped: no supervised
    token left, or a ppo prompt longer than max_length); ``tokens``/``supervised``/``truncated``
    describe ``item``."""

    status: int
    reason: str | None = None
    item: Encoded | None = None
    tokens: int = 0
    supervised: int = 0
    truncated: bool = False
    origin: str = ""
    record: Record | None = field(default=None, repr=False)


class FastIds:
    """The tokenizer's Rust backend behind the one call :mod:`tunelab.data.tokenize` makes
    (``tokenizer(texts, add_special_tokens=False)["input_ids"]``); everything else goes to the tokenizer.

    The transformers wrapper adds about 80 us of Python per call, a third of the cost of an
    average record; the backend gives the same ids (truncation and padding off, special tokens
    recognised as the wrapper does by default; tests compare both).
    """

    def __init__(self, tokenizer: Any):
        from tokenizers import Tokenizer

        self._tokenizer = tokenizer
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    @staticmethod
    def suits(tokenizer: Any) -> bool:
        from tokenizers import Tokenizer

        return isinstance(getattr(tokenizer, "backend_tokenizer", None), Tokenizer)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, **options: Any) -> Any:
        if options:
            return self._tokenizer(text, add_special_tokens=add_special_tokens, **options)
        texts = [text] if isinstance(text, str) else list(text)
        ids = [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not yet set while unpickling
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


def _chars(value: Any) -> int:
    """Characters of text in a record (every string field, nested), its origin excluded."""
    if isinstance(value, str):
        return len(value)
    if dataclasses.is_dataclass(value):
        return sum(_chars(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "origin")
    if isinstance(value, (list, tuple)):
        return sum(_chars(item) for item in value)
    if isinstance(value, dict):
        return sum(_chars(item) for item in value.values())
    return 0


class RowEncoder:
    """Converts and tokenizes the rows of one source of one dataset (picklable: map workers get a copy)."""

    def __init__(self, spec: DatasetSpec, row_format: RowFormat, template: ChatTemplate, tokenizer: Any,
                 settings: EncodeSettings, abort_file: str | None = None):
        self.spec, self.row_format, self.template, self.settings = spec, row_format, template, settings
        self.tokenizer = FastIds(tokenizer) if FastIds.suits(tokenizer) else tokenizer
        self.abort_file = abort_file
        self.limit = record_limit(settings.max_length)
        self.offset = 0  # position of the mapped table's first row in the source (a window of it)

    # -- datasets.map ------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, list], indices: Sequence[int]) -> dict[str, list]:
        """One batch of the source table -> one output row per input row (see :data:`META`)."""
        if self.abort_file and os.path.exists(self.abort_file):
            raise Aborted("another worker stopped on a bad record")
        try:
            results = self.encode(self.row_format.decode(batch, [self.offset + i for i in indices]))
        except DataError as err:
            if self.abort_file:
                report_abort(err, self.abort_file)
            raise
        return self.columns(results)

    def columns(self, results: list[RowResult]) -> dict[str, list]:
        kind = self.settings.kind
        out: dict[str, list] = {name: [] for name in [*PAYLOAD[kind], *META]}
        empty = dict.fromkeys(PAYLOAD[kind])
        for result in results:
            for name, value in (to_row(kind, result.item) if result.item is not None else empty).items():
                out[name].append(value)
            out["status"].append(result.status)
            out["reason"].append(result.reason)
            out["tokens"].append(result.tokens)
            out["supervised"].append(result.supervised)
            out["cut"].append(result.truncated)
            out["length"].append(example_length(result.item) if result.item is not None else 0)
        return out

    # -- rows -> results ---------------------------------------------------------------
    def encode(self, rows: Sequence[RawRow | None]) -> list[RowResult]:
        """Convert and tokenize rows (None = a blank line), in order."""
        results = [self._convert(row) for row in rows]
        records = [r for r in results if r.status == RECORD]
        if self.settings.stage == "pt":
            self._encode_documents(records)
        else:
            for result in records:
                self._encode_one(result)
        for result in records:
            result.record = None  # only the tokens leave this function: records may be large
        return results

    def _convert(self, row: RawRow | None) -> RowResult:
        if row is None:
            return RowResult(BLANK)
        try:
            record = self._record(row)
        except DataError as err:
            if self.settings.on_error == "raise":
                raise
            return RowResult(SKIPPED, reason=str(err))
        return RowResult(RECORD, origin=record.origin, record=record)

    def _record(self, row: RawRow) -> Record:
        """The row's record; a csv row that fails is converted again with its line, to name it."""
        try:
            return self._checked(row)
        except DataError:
            line = self.row_format.line_of(row.index) if row.line is None else None
            if line is None:
                raise
            return self._checked(dataclasses.replace(row, line=line))

    def _checked(self, row: RawRow) -> Record:
        records, _ = to_records([row], self.spec, "raise", require_answer=self.settings.kind != "prompt")
        size = _chars(records[0])
        if size > self.limit:
            raise DataError(
                f"the record holds {size:,} characters of text; at most {self.limit:,} are accepted "
                f"(data.max_length={self.settings.max_length} keeps only the first {self.settings.max_length} "
                "tokens, and tokenizing tens of megabytes at once takes minutes and gigabytes).",
                file=row.file, line=row.line, record=row.index,
                hint="Split the text into several records, or set data.on_error=skip to drop such records.")
        return records[0]

    def _encode_one(self, result: RowResult) -> None:
        s = self.settings
        items, stats = encode_records([result.record], self.template, self.tokenizer, s.stage,  # type: ignore[list-item]
                                      s.max_length, s.train_on_prompt, s.mask_history)
        if items:
            result.item, result.tokens, result.supervised = items[0], stats.tokens, stats.supervised_tokens
            result.truncated = bool(stats.truncated)

    def _encode_documents(self, results: list[RowResult]) -> None:
        """pt: every document's ids + eos in one call (blocks are cut after mixing and the split)."""
        if not results:
            return
        documents, _ = encode_records([r.record for r in results], self.template, self.tokenizer,  # type: ignore[misc]
                                      "pt", sys.maxsize, separate_documents=True)
        assert len(documents) == len(results), "a non-empty text always has a token and eos"
        for result, document in zip(results, documents):
            result.item, result.tokens = document, len(document.input_ids)  # type: ignore[union-attr]


class Aborted(RuntimeError):
    """Raised by a map worker that saw another worker's error report (the report is what matters)."""


def report_abort(err: DataError, path: str) -> None:
    """Write a worker's error where the other workers and the parent look for it (first one wins)."""
    report = {"text": str(err), "file": err.file, "line": err.line, "record": err.record, "field": err.field}
    try:
        with open(path, "x", encoding="utf-8") as handle:
            json.dump(report, handle)
    except FileExistsError:
        pass


def read_abort(path: str) -> DataError | None:
    """The error a map worker reported, rebuilt with its file/line/record/field attributes."""
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except (OSError, ValueError):
        return None
    err = DataError(report["text"])
    err.file, err.line, err.record, err.field = report["file"], report["line"], report["record"], report["field"]
    return err
