"""Which examples each step reads, and how many steps a run has.

Shared by every trainer (the batch loop reads micro-batches of examples, rollout loops
read batches of prompts) and by the memory estimator, which replays a run's batches
without training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

from tunelab.data.batching import plan_batches

if TYPE_CHECKING:
    from tunelab.config import RunConfig


class MicroBatches:
    """Deterministic stream of micro-batches (lists of example indices) across epochs.

    The order depends only on (seed, epoch), so a resumed run reads exactly the batches
    the interrupted one would have read.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self.per_epoch = math.ceil(len(lengths) / batch_size)

    def iterate(self, epoch: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yield (epoch, index in epoch, example indices) from the given position on."""
        while True:
            plan = plan_batches(self.lengths, self.batch_size, shuffle=True, seed=self.seed, epoch=epoch,
                                group_by_length=self.group)
            for index in range(start, len(plan)):
                yield epoch, index, plan[index]
            epoch, start = epoch + 1, 0


def total_steps(cfg: "RunConfig", micro_batches_per_epoch: int, processes: int = 1) -> int:
    """``train.max_steps``, else the optimizer steps of ``train.epochs``.

    One step reads ``grad_accum`` micro-batches on each of ``processes`` ranks, so N
    processes with ``grad_accum: g/N`` run as many steps as one process with ``grad_accum: g``.
    """
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_step = cfg.train.grad_accum * processes
    return max(1, math.ceil(cfg.train.epochs * micro_batches_per_epoch / per_step))
