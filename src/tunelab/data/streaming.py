"""Streaming (``data.streaming: true``): pt and sft examples read, tokenized, shuffled and packed
on the fly, for corpora larger than memory or than the disk budget of a cache.

Sources are ``datasets.IterableDataset`` s (:meth:`tunelab.data.tables.Source.iterable`: local
files, saved datasets, hub splits streamed without a download), read one after another, in
chunks of :data:`CHUNK_ROWS` rows that :class:`tunelab.data.rows.RowEncoder` converts and
tokenizes in this process.

Shuffling is by window: consecutive chunks are gathered until they hold ``data.shuffle_buffer``
examples (sft) or documents (pt), and the window is permuted by a generator seeded with (seed,
epoch, window number). pt documents are then packed into blocks of ``data.max_length`` in that
order, exactly as :func:`tunelab.data.tokenize.encode_texts` would cut them (per document, or as
one stream with ``separate_documents: false``).

Why a window rather than a reservoir buffer: the position after any example is then a few
numbers (:class:`StreamState`: the window's start in its source, as the source's own
``datasets`` state, and the example, or the token of the document, where the next block starts),
so a checkpoint holds a small JSON object and a resumed run continues at exactly the next
example: it re-reads and re-tokenizes the one window it stopped in, not everything before it.
A reservoir's position would include the buffer's contents.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import RunConfig
from tunelab.data.columns import Encoded
from tunelab.data.pipeline import DataBundle, build_data
from tunelab.data.records import IGNORE_INDEX, Example
from tunelab.data.rows import RECORD, EncodeSettings, RowEncoder, RowResult
from tunelab.data.sources import DatasetRegistry, DatasetSpec
from tunelab.data.tables import sources_of
from tunelab.data.templates import ChatTemplate, get_template
from tunelab.errors import ConfigError, DataError

CHUNK_ROWS = 256  # rows read and tokenized together (at most); windows start at chunk boundaries
STREAM_STAGES = ("pt", "sft")


@dataclass(frozen=True)
class StreamState:
    """Where a stream is: JSON-able (``dataclasses.asdict``), saved in checkpoints.

    The window starts at row ``row`` of source ``source`` of dataset ``dataset`` (``source_state``:
    that source's ``datasets`` state there; ``records``: records of the dataset read before it,
    for ``max_samples``); the next example is ``item`` of the window's shuffled order (pt: the
    next block starts at token ``offset`` of that document).
    """

    epoch: int = 0
    window: int = 0
    dataset: int = 0
    source: int = 0
    row: int = 0
    records: int = 0
    source_state: dict[str, Any] | None = None
    item: int = 0
    offset: int = 0


@dataclass
class _Chunk:
    start: StreamState  # the position of its first row (item/offset unused)
    results: list[RowResult] = field(default_factory=list)


class _Reader:
    """Encoded rows of every dataset in order, in chunks, from a position."""

    def __init__(self, specs: list[DatasetSpec], template: ChatTemplate, tokenizer: Any, settings: EncodeSettings,
                 max_samples: int | None, chunk_rows: int = CHUNK_ROWS):
        self.specs, self.template, self.tokenizer = specs, template, tokenizer
        self.settings, self.max_samples, self.chunk_rows = settings, max_samples, chunk_rows

    def chunks(self, start: StreamState) -> Iterator[_Chunk]:
        for d in range(start.dataset, len(self.specs)):
            records = start.records if d == start.dataset else 0
            sources = sources_of(self.specs[d])
            for s in range(start.source if d == start.dataset else 0, len(sources)):
                at = start if (d, s) == (start.dataset, start.source) else StreamState(start.epoch, dataset=d, source=s)
                for chunk in self._source_chunks(self.specs[d], sources[s], at, records):
                    records += sum(r.status == RECORD for r in chunk.results)
                    yield chunk
                    if self.max_samples is not None and records >= self.max_samples:
                        break
                if self.max_samples is not None and records >= self.max_samples:
                    break

    def _source_chunks(self, spec: DatasetSpec, source: Any, at: StreamState, records: int) -> Iterator[_Chunk]:
        """Chunks of one source from ``at`` (``records``: of this dataset before ``at``, for max_samples)."""
        rows: Iterator[dict[str, Any]] = iter(())
        try:
            iterable, row_format = source.iterable()
            if at.source_state is not None:
                iterable.load_state_dict(at.source_state)
            encoder = RowEncoder(spec, row_format, self.template, self.tokenizer, self.settings)
            rows, row = iter(iterable), at.row
            while True:
                state = dataclasses.replace(at, row=row, records=records, source_state=iterable.state_dict())
                batch = [example for _, example in zip(range(self.chunk_rows), rows)]
                if not batch:
                    return
                columns = {key: [example.get(key) for example in batch] for key in batch[0]}
                results = encoder.encode(row_format.decode(columns, range(row, row + len(batch))))
                row += len(batch)
                if self.max_samples is not None:
                    results = _first_records(results, self.max_samples - records)
                records += sum(r.status == RECORD for r in results)
                yield _Chunk(state, results)
        except DataError:
            raise
        except Exception as err:  # datasets raises many types while reading (decoding, parsing, I/O)
            raise source.failure(err) from None
        finally:
            getattr(rows, "close", lambda: None)()  # release the reader's file now, not at interpreter exit


def _first_records(results: list[RowResult], count: int) -> list[RowResult]:
    """The results up to and including the ``count``-th record."""
    seen = 0
    for index, result in enumerate(results):
        seen += result.status == RECORD
        if seen == count:
            return results[:index + 1]
    return results


def check_stream_config(cfg: RunConfig) -> None:
    """Refuse the data settings a stream cannot honour; reads nothing, so a trainer calls it before
    loading the model."""
    data = cfg.data
    if cfg.stage not in STREAM_STAGES:
        raise ConfigError(f"data.streaming serves stages {' and '.join(STREAM_STAGES)}, not '{cfg.stage}'. "
                          "Set data.streaming=false (the prepared cache serves every stage).")
    if data.weights is not None:
        raise ConfigError("data.weights cannot be used with data.streaming: a stream reads its datasets one "
                          "after another without knowing their sizes. Remove data.weights, or set "
                          "data.streaming=false.")
    if data.eval_split:
        raise ConfigError("data.eval_split cannot be used with data.streaming (a stream has no known size to "
                          "hold out from). Name evaluation datasets in data.eval instead.")
    if not data.train:
        raise ConfigError("data.train is empty: name at least one dataset to stream.")


def _valid_state(state: Any) -> bool:
    """A saved position has every :class:`StreamState` field: non-negative integers, and the source's
    ``datasets`` state as a JSON object or null."""
    names = {f.name for f in dataclasses.fields(StreamState)}
    if not isinstance(state, dict) or state.keys() != names:
        return False
    counters = [value for key, value in state.items() if key != "source_state"]
    return all(type(v) is int and v >= 0 for v in counters) and isinstance(state["source_state"], (dict, type(None)))


class ExampleStream:
    """The training examples of ``cfg`` as an endless, resumable stream (one epoch per iteration).

    ``iter(stream)`` yields the examples from the current position to the end of the epoch, then
    moves the position to the start of the next one. :meth:`state_dict` after receiving an
    example is the position of the next one; :meth:`load_state_dict` restores it.
    """

    def __init__(self, cfg: RunConfig, tokenizer: Any, template: ChatTemplate | None = None):
        check_stream_config(cfg)
        data = cfg.data
        registry = DatasetRegistry(data.dataset_dir)
        self.template = template or get_template(data.template, tokenizer, system=data.system)
        self.seed, self.window = cfg.train.seed, data.shuffle_buffer
        self.block_size, self.separate = data.max_length, data.separate_documents
        self.pack = cfg.stage == "pt"
        self._reader = _Reader([registry.resolve(name) for name in data.train], self.template, tokenizer,
                               EncodeSettings.of(cfg), data.max_samples, min(CHUNK_ROWS, self.window))
        self._state = StreamState()

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not _valid_state(state):
            raise ConfigError(f"the saved stream position {state!r} is not one this version of tunelab writes "
                              f"(it needs the fields {', '.join(f.name for f in dataclasses.fields(StreamState))}); "
                              "start the run again without --resume.")
        self._state = StreamState(**state)

    def __iter__(self) -> Iterator[Example]:
        start = self._state
        units = self._units(start)
        yield from (self._blocks(units, start.offset) if self.pack else self._examples(units))
        self._state = StreamState(epoch=start.epoch + 1)

    def _examples(self, units: Iterator[tuple[StreamState, Encoded]]) -> Iterator[Example]:
        for at, example in units:
            self._state = dataclasses.replace(at, item=at.item + 1)
            yield example  # type: ignore[misc]

    def _units(self, start: StreamState) -> Iterator[tuple[StreamState, Encoded]]:
        """(position, example or document) in the shuffled order of each window, from ``start``."""
        number, first = start.window, True
        for window_start, units in self._windows(start):
            order = list(range(len(units)))
            random.Random(f"tunelab-stream-{self.seed}-{start.epoch}-{number}").shuffle(order)
            at = dataclasses.replace(window_start, epoch=start.epoch, window=number)
            for item in range(start.item if first else 0, len(units)):
                yield dataclasses.replace(at, item=item, offset=0), units[order[item]]
            number, first = number + 1, False

    def _windows(self, start: StreamState) -> Iterator[tuple[StreamState, list[Encoded]]]:
        units: list[Encoded] = []
        window_start: StreamState | None = None
        for chunk in self._reader.chunks(start):
            window_start = window_start or chunk.start
            units += [r.item for r in chunk.results if r.item is not None]
            if len(units) >= self.window:
                yield window_start, units
                units, window_start = [], None
        if window_start is not None:
            yield window_start, units

    def _blocks(self, units: Iterator[tuple[StreamState, Encoded]], first_offset: int) -> Iterator[Example]:
        """pt: documents cut into blocks of max_length (``separate_documents``: each on its own, else
        as one stream); the state after a block is where the next one starts."""
        size, buffer = self.block_size, []
        for index, (at, document) in enumerate(units):
            base = first_offset if index == 0 else 0
            ids = document.input_ids[base:]  # type: ignore[union-attr]
            if self.separate:
                for i in range(0, len(ids), size):
                    self._state = (dataclasses.replace(at, offset=base + i + size) if i + size < len(ids)
                                   else dataclasses.replace(at, item=at.item + 1))
                    if len(ids[i:i + size]) > 1:  # a one-token block has nothing to predict
                        yield _block(ids[i:i + size])
                continue
            buffer += ids
            while len(buffer) >= size:
                block, buffer = buffer[:size], buffer[size:]
                self._state = (dataclasses.replace(at, offset=base + len(ids) - len(buffer)) if buffer
                               else dataclasses.replace(at, item=at.item + 1))
                yield _block(block)
        if len(buffer) > 1:
            self._state = StreamState(epoch=self._state.epoch + 1)
            yield _block(buffer)


def _block(ids: list[int]) -> Example:
    return Example(ids, [IGNORE_INDEX, *ids[1:]])


def preview_examples(cfg: RunConfig, tokenizer: Any, template: ChatTemplate, count: int
                     ) -> Iterator[tuple[str, Encoded]]:
    """(origin, example) of the first ``count`` trainable records of ``data.train``, in file order, for any
    stage (pt: each document's first block): read lazily, so a preview of a huge dataset is instant."""
    registry = DatasetRegistry(cfg.data.dataset_dir)
    reader = _Reader([registry.resolve(name) for name in cfg.data.train], template, tokenizer,
                     EncodeSettings.of(cfg), None)
    shown = 0
    for chunk in reader.chunks(StreamState()):
        for result in chunk.results:
            if result.item is None:
                continue
            item = result.item
            if cfg.stage == "pt":
                item = _block(item.input_ids[:cfg.data.max_length])  # type: ignore[union-attr]
            yield result.origin, item
            shown += 1
            if shown == count:
                return


def open_stream(cfg: RunConfig, tokenizer: Any) -> DataBundle:
    """The data of a ``data.streaming`` run: the training stream, and ``data.eval`` prepared as usual
    (evaluation sets are small, and evaluating needs their size)."""
    stream = ExampleStream(cfg, tokenizer)
    evaluation: Sequence[Encoded] = []
    if cfg.data.eval:
        data = cfg.data.model_copy(update={"train": cfg.data.eval, "eval": [], "streaming": False})
        evaluation = build_data(cfg.model_copy(update={"data": data}), tokenizer).train
    return DataBundle(stream, evaluation, stream.template)
