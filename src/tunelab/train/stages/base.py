"""What a stage declares: :class:`StageSpec`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

    from tunelab.config import RunConfig
    from tunelab.methods.base import Method
    from tunelab.train.lifecycle import RunTrainer
    from tunelab.train.objectives import Objective

#: ``(cfg, method, model, tokenizer) -> Objective``; may attach trainable modules to ``model``.
ObjectiveFactory = Callable[["RunConfig", "Method", "nn.Module", Any], "Objective"]


@dataclass(frozen=True)
class StageSpec:
    """One training stage, declared in its own module as ``STAGE``.

    - ``records``: the canonical record types (:mod:`tunelab.data.records`) it trains on,
      and ``needs``, the phrase naming them in an error about the wrong kind of data;
    - ``encoder``: the :mod:`tunelab.data.tokenize` function that turns one record (or, for
      ``pt``, the texts) into tokenized examples;
    - ``trainer``: the :class:`~tunelab.train.lifecycle.RunTrainer` subclass whose step
      drives it: :class:`~tunelab.train.loop.Trainer` (the batch loop) or a rollout loop;
    - ``objective``: for the batch loop, the factory of its loss; rollout loops compute
      their losses in their own step and leave it None;
    - ``metrics``: the keys, besides the common ones (step, lr, tokens_per_s, and for the
      batch loop epoch, grad_norm, peak_memory_bytes), of its training rows in
      ``metrics.jsonl``; eval rows carry the same names with ``eval_`` in front.
    """

    name: str
    summary: str
    records: tuple[type, ...]
    needs: str
    encoder: Callable[..., Any]
    trainer: type["RunTrainer"]
    metrics: tuple[str, ...]
    objective: ObjectiveFactory | None = None

    def __post_init__(self) -> None:
        if (self.objective is None) == (self.loop == "batch"):
            raise ValueError(f"stage {self.name}: the batch loop needs an objective; a rollout loop takes none")

    @property
    def loop(self) -> str:
        """"batch" or "rollout": the kind of loop that drives the stage."""
        return self.trainer.loop
