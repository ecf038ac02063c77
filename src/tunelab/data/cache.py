"""The tokenized cache: prepare a run's data once, memory-map it on every later run and resume.

:func:`prepare` looks up ``<cache_root>/<stage>-<key>/`` (key: :mod:`tunelab.data.fingerprint`).
On a miss it builds it:

1. every source of every dataset is read by ``datasets`` (:mod:`tunelab.data.tables`) and
   mapped with :class:`tunelab.data.rows.RowEncoder` in ``data.num_workers`` processes: one
   output row per source row (blank, record, or skipped record), tokenized;
2. records are selected by row number exactly as the in-memory pipeline selects them
   (``max_samples`` per dataset, mixing by weight, the eval split: :mod:`tunelab.data.selection`),
   and records that cannot train are dropped and counted;
3. the selected rows are written to ``train.arrow`` and ``eval.arrow`` (Arrow IPC streams, the
   format ``datasets`` writes: ``datasets.Dataset.from_file`` opens them) in the layout of
   :mod:`tunelab.data.columns`; pt documents are cut into blocks here, after mixing, so blocks
   span the same documents as before; ``meta.json`` holds the counts and the key's inputs.

The directory appears in one rename (:func:`tunelab.io.atomic_dir`), and concurrent prepares
of the same key (two ranks, two runs) wait on a file lock and then share it. With
``data.max_samples``, sources are mapped in growing windows until enough records are found,
so a quick run on the first thousand records of a huge file does not tokenize all of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunelab.config import DataConfig, RunConfig
from tunelab.data.columns import PAYLOAD, Kind, schema
from tunelab.data.fingerprint import cache_key
from tunelab.data.hub import quiet_datasets
from tunelab.data.records import IGNORE_INDEX
from tunelab.data.rows import META, RECORD, SKIPPED, EncodeSettings, RowEncoder, read_abort
from tunelab.data.selection import mix, split_eval
from tunelab.data.sources import DatasetRegistry, DatasetSpec
from tunelab.data.tables import sources_of
from tunelab.data.templates import ChatTemplate
from tunelab.data.tokenize import TokenizeStats
from tunelab.errors import ConfigError
from tunelab.io import atomic_dir, write_json

META_FILE = "meta.json"
CACHE_FORMAT = 1
MAP_BATCH = 1000  # rows per map call: large enough to amortise the call, small enough to stop early
MIN_ROWS_PER_PROCESS = 1000  # below this a worker process costs more than it saves
WRITE_CHUNK = 8192  # rows gathered and written at a time (bounds the writer's memory)
MAX_REASONS = 5


def cache_root(data: DataConfig) -> Path:
    """``data.cache_dir``, else ``$TUNELAB_CACHE/data`` (default ``~/.cache/tunelab/data``)."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")) / "data"


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Prepared:
    """A cache directory: ``train.arrow``, ``eval.arrow`` (layout ``kind``), and its counts."""

    path: Path
    kind: Kind
    stats: dict[str, Any]
    hit: bool


@dataclass
class _Mapped:
    """The tokenized rows of one dataset, and which of them are records."""

    table: pa.Table
    records: np.ndarray
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def prepare(cfg: RunConfig, tokenizer: Any, template: ChatTemplate, progress: bool = False) -> Prepared:
    """The cache of ``cfg``'s data for ``cfg.stage``: found, or built now (see the module docstring)."""
    data = cfg.data
    registry = DatasetRegistry(data.dataset_dir)
    train_specs = [registry.resolve(name) for name in data.train]
    eval_specs = [registry.resolve(name) for name in data.eval]
    key, inputs = cache_key(cfg, tokenizer, template, train_specs, eval_specs)
    root = cache_root(data)
    target = root / f"{cfg.stage}-{key}"
    with _locked(root / f".{target.name}.lock"):
        if not (target / META_FILE).is_file():
            work = Path(tempfile.mkdtemp(prefix=f".work-{target.name}-", dir=root))
            try:
                _build(cfg, tokenizer, template, train_specs, eval_specs, work, target, inputs, progress)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return open_prepared(target, hit=False)
    return open_prepared(target, hit=True)


def open_prepared(path: Path, hit: bool = True) -> Prepared:
    """The cache at ``path`` (a directory :func:`prepare` wrote)."""
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    return Prepared(path, meta["kind"], meta["stats"], hit)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a no-op where ``fcntl`` does not exist)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as err:
        raise ConfigError(f"the data cache directory {path.parent} cannot be written ({err.strerror}). Set "
                          "data.cache_dir (or TUNELAB_CACHE) to a writable directory.") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(cfg: RunConfig, tokenizer: Any, template: ChatTemplate, train_specs: list[DatasetSpec],
           eval_specs: list[DatasetSpec], work: Path, target: Path, inputs: dict[str, Any], progress: bool) -> None:
    data, seed = cfg.data, cfg.train.seed
    settings = EncodeSettings.of(cfg)
    mapper = _Mapper(settings, template, tokenizer, data.num_workers or default_workers(), work, progress)
    train_parts = [mapper.dataset(spec, data.max_samples) for spec in train_specs]
    eval_parts = [mapper.dataset(spec, data.max_samples) for spec in eval_specs]
    train_table, train_records = _joined(train_parts)
    rows = mix(train_records, data.weights, seed)
    if data.eval_split and not data.eval:
        rows, eval_rows = split_eval(rows, data.eval_split, seed)
        eval_table = train_table
    else:
        eval_table, eval_records = _joined(eval_parts) if eval_parts else (train_table.slice(0, 0), [])
        eval_rows = [row for part in eval_records for row in part]
    writer = _Writer(settings, data.max_length, data.separate_documents)
    with atomic_dir(target) as tmp:
        train = writer.write(train_table, rows, tmp / "train.arrow")
        skipped = sum(part.skipped for part in train_parts + eval_parts)
        reasons = [reason for part in train_parts + eval_parts for reason in part.reasons][:MAX_REASONS]
        stats = {"records": len(rows), **asdict(train), "skipped": skipped, "skip_reasons": reasons}
        if not train.examples:
            raise ConfigError(f"no training examples are left after tokenization ({stats}). Check data.max_length "
                              "and that records have answers to learn from.")
        evaluation = writer.write(eval_table, eval_rows, tmp / "eval.arrow")
        stats.update(eval_records=len(eval_rows), eval_examples=evaluation.examples)
        write_json(tmp / META_FILE, {"format": CACHE_FORMAT, "stage": cfg.stage, "kind": writer.kind,
                                     "stats": stats, "inputs": inputs})


def _joined(parts: list[_Mapped]) -> tuple[pa.Table, list[list[int]]]:
    """One table of all datasets' rows, and each dataset's record rows numbered in it."""
    offsets = np.cumsum([0] + [part.table.num_rows for part in parts])
    table = pa.concat_tables([part.table for part in parts])
    return table, [(part.records + start).tolist() for part, start in zip(parts, offsets)]


class _Mapper:
    """Runs :class:`RowEncoder` over datasets' sources with ``datasets.map``."""

    def __init__(self, settings: EncodeSettings, template: ChatTemplate, tokenizer: Any, workers: int, work: Path,
                 progress: bool):
        datasets = quiet_datasets()
        self.settings, self.template, self.tokenizer = settings, template, tokenizer
        self.workers, self.work, self.progress = workers, work, progress
        self.abort_file = str(work / "abort.json")
        output = pa.schema([*PAYLOAD[settings.kind].items(), *META.items()])
        self.features = datasets.Features.from_arrow_schema(output)
        self.count = 0

    def dataset(self, spec: DatasetSpec, max_samples: int | None) -> _Mapped:
        """All rows of ``spec`` tokenized (with ``max_samples``: enough of them for that many records)."""
        tables: list[pa.Table] = []
        found = 0
        for source in sources_of(spec):
            table, row_format = source.table(self.work)
            encoder = RowEncoder(spec, row_format, self.template, self.tokenizer, self.settings, self.abort_file)
            start = 0
            while start < len(table) and (max_samples is None or found < max_samples):
                stop = len(table) if max_samples is None else min(len(table), start + max(max_samples - found,
                                                                                          MAP_BATCH))
                encoder.offset = start
                part = table if (start, stop) == (0, len(table)) else table.select(range(start, stop))
                mapped = self._map(part, encoder, f"tokenize {spec.name}")
                found += int(np.count_nonzero(mapped["status"].to_numpy() == RECORD))
                tables.append(mapped)
                start = stop
        joined = pa.concat_tables(tables) if tables else self.features.arrow_schema.empty_table()
        status = joined["status"].to_numpy()
        skipped_rows = np.flatnonzero(status == SKIPPED)
        records = np.flatnonzero(status == RECORD)[:max_samples]
        reasons = joined["reason"].take(pa.array(skipped_rows[:MAX_REASONS])).to_pylist()
        return _Mapped(joined, records, int(skipped_rows.size), reasons)

    def _map(self, table: Any, encoder: RowEncoder, desc: str) -> pa.Table:
        datasets = quiet_datasets()
        processes = min(self.workers, len(table) // MIN_ROWS_PER_PROCESS)
        self.count += 1
        (datasets.enable_progress_bars if self.progress else datasets.disable_progress_bars)()
        try:
            mapped = table.map(encoder, batched=True, batch_size=MAP_BATCH, with_indices=True,
                               num_proc=processes if processes > 1 else None, remove_columns=table.column_names,
                               features=self.features, cache_file_name=str(self.work / f"map-{self.count}.arrow"),
                               new_fingerprint=f"tunelab-map-{self.count}", load_from_cache_file=False, desc=desc)
        except Exception:  # a worker's DataError arrives re-raised, wrapped or (for the others) as Aborted
            reported = read_abort(self.abort_file)
            if reported is not None:
                raise reported from None
            raise
        finally:
            datasets.disable_progress_bars()
        return mapped.data.table.replace_schema_metadata(None)


class _Writer:
    """Writes the selected rows of one side in the cache layout, and counts what became of them."""

    def __init__(self, settings: EncodeSettings, max_length: int, separate_documents: bool):
        self.pack = settings.kind == "document"
        self.kind: Kind = "sequence" if self.pack else settings.kind
        self.max_length, self.separate = max_length, separate_documents
        self.columns = [*PAYLOAD[self.kind], "length"]

    def write(self, table: pa.Table, rows: list[int], path: Path) -> TokenizeStats:
        selected = np.asarray(rows, dtype=np.int64)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema(self.kind)) as writer:
            if self.pack:
                return self._write_blocks(table, selected, writer)
            return self._write_rows(table, selected, writer)

    def _write_rows(self, table: pa.Table, rows: np.ndarray, writer: Any) -> TokenizeStats:
        lengths = table["length"].to_numpy()
        kept = rows[lengths[rows] > 0]
        for start in range(0, len(kept), WRITE_CHUNK):
            writer.write_table(_gather(table, kept[start:start + WRITE_CHUNK]).select(self.columns)
                               .cast(schema(self.kind)))
        return TokenizeStats(examples=len(kept), truncated=int(table["cut"].to_numpy()[kept].sum()),
                             dropped=len(rows) - len(kept), tokens=int(table["tokens"].to_numpy()[kept].sum()),
                             supervised_tokens=int(table["supervised"].to_numpy()[kept].sum()))

    def _write_blocks(self, table: pa.Table, rows: np.ndarray, writer: Any) -> TokenizeStats:
        """pt: documents (ids + eos, in the selected order) cut into blocks of max_length, exactly as
        :func:`tunelab.data.tokenize.encode_texts` cuts them; a block of one token has nothing to predict
        and is dropped."""
        stats = TokenizeStats()
        carry = np.zeros(0, dtype=np.int32)  # separate_documents=False: the stream's unfinished block
        for start in range(0, len(rows), WRITE_CHUNK):
            documents = _gather(table, rows[start:start + WRITE_CHUNK])["input_ids"].combine_chunks()
            values = documents.flatten().to_numpy()
            lengths = pc.list_value_length(documents).to_numpy()
            if self.separate:
                self._emit(writer, values, _document_blocks(lengths, self.max_length), stats)
                continue
            values = np.concatenate([carry, values])
            full = len(values) // self.max_length * self.max_length
            self._emit(writer, values[:full], np.arange(0, full, self.max_length), stats)
            carry = values[full:]
        if len(carry):
            self._emit(writer, carry, np.zeros(1, dtype=np.int64), stats)
        return stats

    def _emit(self, writer: Any, values: np.ndarray, starts: np.ndarray, stats: TokenizeStats) -> None:
        """Write the blocks of ``values`` that begin at ``starts`` (each runs to the next start)."""
        if not len(starts):
            return
        offsets = np.append(starts, len(values)).astype(np.int32)
        lengths = np.diff(offsets)
        labels = values.copy()
        labels[starts] = IGNORE_INDEX  # nothing predicts a block's first token
        keep = lengths > 1
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
        masked = pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels, pa.int32()))
        batch = pa.table({"input_ids": ids, "labels": masked, "truncated": np.zeros(len(starts), dtype=bool),
                          "length": lengths.astype(np.int32)}).filter(pa.array(keep))
        writer.write_table(batch.cast(schema("sequence")))
        stats.examples += int(keep.sum())
        stats.dropped += int((~keep).sum())
        stats.tokens += int(lengths[keep].sum())
        stats.supervised_tokens += int((lengths[keep] - 1).sum())


def _gather(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table``'s ``rows`` in that order, as one chunk. Runs of consecutive rows (the usual case: no
    mixing weights) are sliced, which costs nothing; a shuffled order is gathered with ``take``."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    if len(breaks) > len(rows) // 64:
        return table.take(pa.array(rows)).combine_chunks()
    runs = np.split(rows, breaks)
    return pa.concat_tables([table.slice(int(run[0]), len(run)) for run in runs if len(run)]).combine_chunks()


def _document_blocks(lengths: np.ndarray, block_size: int) -> np.ndarray:
    """Start offsets of the blocks of consecutive documents, each document cut on its own."""
    counts = -(-lengths // block_size)
    doc_starts = np.cumsum(lengths) - lengths
    first_block = np.cumsum(counts) - counts
    within = np.arange(int(counts.sum())) - np.repeat(first_block, counts)
    return np.repeat(doc_starts, counts) + within * block_size
