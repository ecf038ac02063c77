"""Which records train and which evaluate: mixing datasets by weight and holding out an eval split.

Both work on any sequence (records in memory, or row numbers of a tokenized table), and their
random choices depend only on the sizes and the seed: the cached pipeline, which selects row
numbers, picks exactly the records the in-memory pipeline picks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from tunelab.errors import ConfigError

T = TypeVar("T")


def mix(parts: list[Sequence[T]], weights: list[float] | None, seed: int) -> list[T]:
    """Concatenate datasets, or resample them to the given mixing proportions.

    With weights, the mixture keeps the total size and takes ``w_i / sum(w)`` of it from
    dataset i, sampling with replacement where a dataset is smaller than its share.
    """
    if weights is None:
        return [item for part in parts for item in part]
    if len(weights) != len(parts):
        raise ConfigError(f"data.weights has {len(weights)} values but data.train names {len(parts)} datasets; "
                          "give one weight per dataset.")
    rng = random.Random(seed)
    total = sum(len(p) for p in parts)
    norm = sum(weights)
    mixed: list[T] = []
    for part, weight in zip(parts, weights):
        share = round(total * weight / norm)
        if not part or share == 0:
            continue
        mixed.extend(rng.sample(part, share) if share <= len(part) else rng.choices(part, k=share))
    rng.shuffle(mixed)
    return mixed


def split_eval(items: Sequence[T], eval_split: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out a fraction (< 1) or a count (>= 1) of the records, chosen by ``seed``."""
    if eval_split <= 0:
        return list(items), []
    count = int(eval_split) if eval_split >= 1 else round(len(items) * eval_split)
    if not 0 < count < len(items):
        raise ConfigError(f"data.eval_split={eval_split} holds out {count} of {len(items)} records; it must leave "
                          "at least one record on each side.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
