"""Progress bars for the commands that work through a dataset (``predict``, ``eval``).

A bar goes to stderr, so stdout keeps only what a command means to print (and what a
script pipes on). It is drawn only on a terminal: a log file or CI output would get
carriage-return noise, not progress. The training bar (:mod:`tunelab.train.monitor`) has
its own rules (it also writes the run's log).
"""

from __future__ import annotations

import sys
from typing import Iterator, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr is a terminal a bar can redraw in place."""
    return sys.stderr.isatty()


def track(batches: Sequence[Sequence[T]], label: str | None, unit: str) -> Iterator[Sequence[T]]:
    """Yield ``batches`` while a bar named ``label`` counts their items (``unit``: what one item is).

    ``label=None`` (the command's ``--quiet``, or a library caller) or no terminal: no bar.
    The bar disappears when done, so a command's output ends with its result, not the bar.
    """
    if label is None or not on_terminal():
        yield from batches
        return
    with tqdm(total=sum(len(batch) for batch in batches), desc=label, unit=unit, file=sys.stderr, leave=False,
              dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))
