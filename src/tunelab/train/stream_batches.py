"""Micro-batches read from a stream (``data.streaming``): the batch loop's batch source when
examples are tokenized on the fly (:class:`tunelab.data.streaming.ExampleStream`) instead of read
from a prepared cache.

:class:`StreamBatches` answers like :class:`tunelab.train.batches.MicroBatches`
(``iterate(epoch, start)`` yields (epoch, batch in epoch, example indices)), so the batch loop's
step is the same for both. The indices number the examples in the order they were read, and
:attr:`StreamBatches.examples` holds the examples of the last ``keep`` micro-batches under those
numbers: a step reads ``train.grad_accum`` micro-batches and then collates them (again after an
out-of-memory split), so memory holds one step's examples, never the corpus.

A micro-batch is consecutive examples of the stream (the stream shuffles by window); there is no
length grouping, which would need examples from further ahead. The position is the stream's own
(:meth:`StreamBatches.state_dict`, a small JSON object the lifecycle saves in the checkpoint's
trainer state), so a resumed run reads, as its next example, the one after the last example the
interrupted run trained on.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Any

from tunelab.config import RunConfig
from tunelab.data.columns import Encoded, example_length
from tunelab.data.streaming import ExampleStream, check_stream_config
from tunelab.errors import ConfigError, DataError
from tunelab.train.distributed import world_size


def check_streaming(cfg: RunConfig) -> None:
    """Refuse a streaming run the trainers cannot do; reads nothing (called before the model loads)."""
    check_stream_config(cfg)
    if cfg.train.max_steps is None:
        raise ConfigError("data.streaming needs train.max_steps: a stream's length is unknown until it has been "
                          "read, so train.epochs cannot say how many steps to run. Set train.max_steps (one step "
                          "reads train.batch_size x train.grad_accum examples), or set data.streaming=false.")
    processes = world_size()
    if processes > 1:
        raise ConfigError(f"data.streaming reads one stream in one process; this launch has {processes} processes, "
                          "and the stream is not split between them (each would train on the same examples). "
                          "Launch a single process, or set data.streaming=false to train on prepared data.")


class RecentExamples:
    """The examples of the last few micro-batches, by running number (``examples[i]``,
    ``lengths[i]``, as the batch loop indexes a cached view)."""

    def __init__(self) -> None:
        self._held: dict[int, Encoded] = {}
        self.lengths: dict[int, int] = {}

    def hold(self, first: int, examples: list[Encoded]) -> list[int]:
        """Keep ``examples`` under the numbers from ``first`` on; returns their numbers."""
        numbers = list(range(first, first + len(examples)))
        for number, example in zip(numbers, examples):
            self._held[number], self.lengths[number] = example, example_length(example)
        return numbers

    def forget(self, numbers: list[int]) -> None:
        for number in numbers:
            del self._held[number], self.lengths[number]

    def __getitem__(self, number: int) -> Encoded:
        try:
            return self._held[number]
        except KeyError:
            raise IndexError(f"streamed example {number} is not held: only the examples of the last micro-batches "
                             "are kept") from None


class StreamBatches:
    """Micro-batches of ``batch_size`` consecutive examples of ``stream``; the last ``keep`` of them
    stay readable in :attr:`examples`."""

    #: Micro-batches per epoch: unknown until the stream has been read (streaming runs set train.max_steps).
    per_epoch = math.inf

    def __init__(self, stream: ExampleStream, batch_size: int, keep: int):
        self.stream, self.batch_size, self.keep = stream, batch_size, keep
        self.examples = RecentExamples()
        self._read = 0
        self._held: deque[list[int]] = deque()

    @property
    def lengths(self) -> dict[int, int]:
        """Length of each held example, by number (as :attr:`MicroBatches.lengths` by index)."""
        return self.examples.lengths

    def state_dict(self) -> dict[str, Any]:
        """The stream's position after the last micro-batch handed out (JSON)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise ConfigError("the checkpoint holds no stream position (it was written by a run without "
                              "data.streaming), so this streaming run cannot continue from it. Resume with the "
                              "run's own config, or start over with --overwrite.")
        self.stream.load_state_dict(state)

    def iterate(self, epoch: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yield (epoch, index in epoch, example numbers) from the stream's position on.

        The stream's position says where to read; ``epoch`` and ``start`` (the trainer's saved
        position) only continue the numbering of the batches. The last micro-batch of an epoch
        may be smaller. A stream that yields nothing in a whole epoch is an error, not a hang."""
        index, empty_passes = start, 0
        while True:
            at = self.stream.state_dict()["epoch"]
            index = index if at == epoch else 0
            epoch, batch, read = at, [], 0
            for example in self.stream:  # to the end of this epoch
                batch.append(example)
                read += 1
                if len(batch) == self.batch_size:
                    yield epoch, index, self._hold(batch)
                    batch, index = [], index + 1
            if batch:
                yield epoch, index, self._hold(batch)
            empty_passes = empty_passes + 1 if read == 0 else 0
            if empty_passes == 2:  # the second empty pass started at an epoch's start
                raise DataError("the training stream holds no trainable example (every record was skipped or "
                                "dropped). Check data.train, or run `tunelab data preview CONFIG` to see what the "
                                "records become.")
            index = 0

    def _hold(self, batch: list[Encoded]) -> list[int]:
        numbers = self.examples.hold(self._read, batch)
        self._read += len(batch)
        self._held.append(numbers)
        while len(self._held) > self.keep:
            self.examples.forget(self._held.popleft())
        return numbers
