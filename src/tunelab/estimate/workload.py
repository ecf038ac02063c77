"""What each micro-batch of the run will look like, from the real data.

Activation memory scales with the tokens of one micro-batch, and those depend on the
data: a packed batch is one row holding the batch's examples back to back (its length
is the sum of their lengths), a padded batch is ``batch x longest example in the batch``.
Guessing from ``max_length`` over-estimates short-example datasets several times, so
the data is read and tokenized exactly as ``tunelab train`` does (cheap next to
training), and the micro-batches are planned with the loop's own sampler, seed and
length grouping. The estimate can then take the largest micro-batch the run will really
see, not a worst case it never reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from tunelab.config import RunConfig
from tunelab.data.batching import PadWidth
from tunelab.data.records import IGNORE_INDEX as IGNORE
from tunelab.data.pipeline import DataBundle, build_data, example_length
from tunelab.data.records import Example, PairExample, UnpairedExample
from tunelab.train.batches import MicroBatches, total_steps

#: Python-object bytes per token of a tokenized example held in memory: ``input_ids`` and
#: ``labels`` are lists of ints (an 8-byte pointer each, plus a 28-byte int object for
#: values outside CPython's small-int cache). Measured with sys.getsizeof on SmolLM2 data.
DATASET_BYTES_PER_TOKEN = 72


@dataclass(frozen=True)
class MicroBatch:
    """Shape of one micro-batch as the model sees it."""

    rows: int          # batch dimension (1 when packed)
    width: int         # sequence dimension (with padding)
    tokens: int        # real (non-pad) tokens
    supervised: int    # positions whose next token carries a label (rows of the LM head)
    sequences: int     # examples in the micro-batch

    @property
    def positions(self) -> int:
        """Positions the model computes, padding included."""
        return self.rows * self.width

    def masked(self, packed: bool) -> bool:
        """Whether attention gets an explicit mask: several packed sequences need a block-diagonal
        one; padded rows get none (right padding under causal attention never reaches a real token)."""
        return packed and self.sequences > 1


@dataclass(frozen=True)
class Workload:
    """The micro-batches of a run and the data facts the estimate reports."""

    batches: list[MicroBatch]
    packed: bool
    steps: int
    examples: int
    mean_length: float
    dataset_bytes: int


def _sequences(example: Any) -> list[Example]:
    """The token sequences one example puts through the model (both sides of a pair)."""
    if isinstance(example, PairExample):
        return [example.chosen, example.rejected]
    if isinstance(example, UnpairedExample):
        return [example.example]
    return [example]


def _supervised(sequence: Example) -> int:
    """Labelled next-token positions; the first label never counts (packing masks it, and
    padded rows shift it out)."""
    return sum(1 for label in sequence.labels[1:] if label != IGNORE)


def shape_of(examples: Iterable[Any], packed: bool, pad_width: PadWidth = PadWidth()) -> MicroBatch:
    """The micro-batch that the batcher (:mod:`tunelab.data.batching`) builds from ``examples``."""
    sequences = [s for e in examples for s in _sequences(e)]
    lengths = [len(s.input_ids) for s in sequences]
    tokens = sum(lengths)
    rows, width = (1, tokens) if packed else (len(lengths), pad_width.of(max(lengths)))
    return MicroBatch(rows=rows, width=width, tokens=tokens,
                      supervised=sum(_supervised(s) for s in sequences), sequences=len(sequences))


def plan(cfg: RunConfig, data: DataBundle, packed: bool) -> Workload:
    """Every micro-batch of the run (max_steps or epochs), in the loop's order."""
    lengths = [example_length(e) for e in data.train]
    stream = MicroBatches(lengths, cfg.train.batch_size, cfg.train.seed, cfg.data.group_by_length)
    steps = total_steps(cfg, stream.per_epoch)
    batches = []
    iterator = stream.iterate(0, 0)
    pad_width = PadWidth(cfg.data.pad_to_multiple_of, cfg.data.max_length)
    for _ in range(steps * cfg.train.grad_accum):
        _, _, indices = next(iterator)
        batches.append(shape_of([data.train[i] for i in indices], packed, pad_width))
    tokens = sum(len(s.input_ids) for e in data.train for s in _sequences(e))
    return Workload(batches=batches, packed=packed, steps=steps, examples=len(data.train),
                    mean_length=tokens / max(len(data.train), 1),
                    dataset_bytes=tokens * DATASET_BYTES_PER_TOKEN)


def load_workload(cfg: RunConfig, tokenizer: Any, packed: bool) -> Workload:
    """Read and tokenize ``cfg.data`` like the trainer, then plan its micro-batches."""
    return plan(cfg, build_data(cfg, tokenizer), packed)

