"""What a batch-loop stage computes from a batch: the :class:`Objective` contract and its helpers.

Every objective returns a loss *summed* over its units (supervised tokens for language
modelling, pairs for preference losses, examples for KTO) plus the number of units, so
the loop can divide by the total over all micro-batches of an optimizer step: accumulated
gradients then equal the large-batch gradient exactly (token-level normalisation).
Metrics are summed the same way, so the loop's averages are exact however a step is cut.

The language-model head is applied by us, in chunks (see ``losses.causal_lm_loss``), on
the hidden states of :func:`tunelab.models.forward.hidden_states`, so the full
batch x length x vocabulary logits never exist at once.

This module holds the contract, causal LM (stages ``pt`` and ``sft``) and the helpers the
sequence-level objectives share; each of those lives in its stage's module
(:mod:`tunelab.train.stages`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunelab.data.records import IGNORE_INDEX
from tunelab.models.forward import Batch, hidden_states
from tunelab.train.losses import causal_lm_loss, sequence_logps

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.methods.base import Method


class Objective:
    """Base: a stage's loss over one micro-batch."""

    def count(self, batch: Batch) -> int:
        """Units in this micro-batch that the loss is summed over."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss summed over units, metrics summed over units) for one micro-batch."""
        raise NotImplementedError

    def eval_summary(self, result: dict[str, float]) -> dict[str, float]:
        """The eval metrics (``eval_loss``, ``eval_<metric>``) plus any derived from them."""
        return result

    def save(self, model: nn.Module, run_dir: Path) -> None:
        """Write what the stage adds beyond the method's weights (a reward model's value head)."""


class CausalLMObjective(Objective):
    """Next-token cross-entropy on supervised tokens (stages ``pt`` and ``sft``)."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def count(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        hidden, head = hidden_states(model, batch)
        total, _ = causal_lm_loss(hidden, head, batch["labels"], self.chunk_size)
        return total, {}

    def eval_summary(self, result: dict[str, float]) -> dict[str, float]:
        """Adds ``eval_perplexity`` = exp(mean token loss), capped so a diverged run still logs a number."""
        return {**result, "eval_perplexity": math.exp(min(result["eval_loss"], 50.0))}


def causal_lm_objective(cfg: "RunConfig", method: "Method", model: nn.Module, tokenizer: Any) -> Objective:
    """The objective factory of stages ``pt`` and ``sft``."""
    return CausalLMObjective(cfg.train.loss_chunk_size)


# ------------------------------------------------------------------- sequence-level helpers

def batch_logps(model: nn.Module, batch: Batch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed label log-prob [S] fp32, supervised token count [S]) of every sequence in ``batch``."""
    hidden, head = hidden_states(model, batch)
    return sequence_logps(hidden, head, batch["labels"], batch["sequence_index"], int(batch["num_sequences"]),
                          chunk_size)


def length_mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums divided by their token counts (an empty sequence counts as one token)."""
    return sums / counts.clamp(min=1)


def halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) of a pair batch laid out ``[chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}]``."""
    n = values.shape[0] // 2
    return values[:n], values[n:]


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs (the loop divides by the pair count)."""
    return {"rewards/chosen": chosen_rewards.sum().detach(),
            "rewards/rejected": rejected_rewards.sum().detach(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum().detach(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).sum().float()}
