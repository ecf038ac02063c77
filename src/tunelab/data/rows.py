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


class BatchedIds:
    """A tokenizer stand-in that tokenizes a whole batch of records' texts in one call.

    :mod:`tunelab.data.tokenize` tokenizes each record with its own call, and per call the
    tokenizer costs as much again as the tokenizing itself (measured: 5.3-6.4 us per token one
    record at a time, 2.5-2.7 us in one call per 1,000 records, on SmolLM2's tokenizer). So a batch
    is encoded twice: first while :meth:`record` ing, answering every text with no ids, to learn
    which texts the records need; then, after :meth:`fetch` tokenized all of them at once, answering
    from those ids. tokenize.py stays the one place that decides what is tokenized and how labels
    follow; a text the first pass did not foresee is tokenized when asked. Only the call tokenize.py
    makes (``tok(texts, add_special_tokens=False)["input_ids"]``) is answered here; every other
    attribute is the tokenizer's. The Rust backend is called directly where the tokenizer has one (the
    transformers wrapper adds ~80 us of Python per call), with truncation and padding off and special
    tokens matched as the wrapper matches them by default: the same ids (tested).
    """

    def __init__(self, tokenizer: Any):
        from tokenizers import Tokenizer

        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = Tokenizer.from_str(backend.to_str()) if isinstance(backend, Tokenizer) else None
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()
            self._backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        self._known: dict[str, list[int]] = {}
        self._asked: list[str] | None = None

    def record(self) -> None:
        self._asked, self._known = [], {}

    def fetch(self) -> None:
        texts = list(dict.fromkeys(self._asked or []))
        self._known, self._asked = dict(zip(texts, self._encode(texts))), None

    def forget(self) -> None:
        self._known = {}

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return self._tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, **options: Any) -> Any:
        if options or add_special_tokens:
            return self._tokenizer(text, add_special_tokens=add_special_tokens, **options)
        texts = [text] if isinstance(text, str) else list(text)
        if self._asked is not None:
            self._asked += texts
            ids: list[list[int]] = [[] for _ in texts]
        else:
            missing = [t for t in texts if t not in self._known]
            self._known.update(zip(missing, self._encode(missing)))
            ids = [self._known[t] for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not yet set while unpickling
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


class _Remembered:
    """A template whose ``segments`` and ``render`` results are kept for the second pass over a batch."""

    def __init__(self, template: ChatTemplate):
        self._template, self._memo = template, {}

    def segments(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("segments", args, kwargs)

    def render(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("render", args, kwargs)

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        key = (name, _frozen(args), _frozen(kwargs))
        if key not in self._memo:
            self._memo[key] = getattr(self._template, name)(*args, **kwargs)
        return self._memo[key]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._template, name)


def _frozen(value: Any) -> Any:
    """A hashable copy of messages, tools and options (lists, dicts and dataclasses inside)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    if dataclasses.is_dataclass(value):
        return (type(value).__name__, *(_frozen(getattr(value, f.name)) for f in dataclasses.fields(value)))
    return value


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
        self.tokenizer = BatchedIds(tokenizer)
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
        """Convert and tokenize rows (None = a blank line), in order; the tokenizer is called once for
        all of them (:class:`BatchedIds`)."""
        results = [self._convert(row) for row in rows]
        records = [r for r in results if r.status == RECORD]
        template = _Remembered(self.template)
        self.tokenizer.record()
        try:
            for result in records:
                self._encode_one(result, template)
        except Exception:  # noqa: BLE001 - the second pass raises it again, naming its record
            pass
        self.tokenizer.fetch()
        try:
            for result in records:
                self._encode_one(result, template)
        finally:
            self.tokenizer.forget()
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

    def _encode_one(self, result: RowResult, template: Any) -> None:
        """Tokenize one record (pt: the whole document and eos; blocks are cut after mixing and the split)."""
        s = self.settings
        max_length = sys.maxsize if s.stage == "pt" else s.max_length
        items, stats = encode_records([result.record], template, self.tokenizer, s.stage,  # type: ignore[list-item]
                                      max_length, s.train_on_prompt, s.mask_history)
        result.item = items[0] if items else None
        result.tokens, result.supervised = stats.tokens, stats.supervised_tokens
        result.truncated = bool(stats.truncated)


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
