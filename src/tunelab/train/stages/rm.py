"""Stage ``rm``: a Bradley-Terry reward model, a scalar head on the last token of each answer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunelab.data.records import Preference
from tunelab.data.tokenize import encode_preference
from tunelab.models.forward import Batch
from tunelab.models.value_head import ValueHead, attach_value_head, save_value_head, sequence_scores
from tunelab.train.loop import Trainer
from tunelab.train.losses import pairwise_reward_loss
from tunelab.train.objectives import Objective, halves, pair_metrics
from tunelab.train.stages.base import StageSpec

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.methods.base import Method


class RewardModelObjective(Objective):
    """Bradley-Terry loss on the head's scores of chosen and rejected answers.

    Units are pairs. Metrics: ``accuracy`` (chosen scored strictly higher: a constant
    model scores 0, not 0.5) and the mean chosen/rejected scores and margin.
    """

    def __init__(self, head: ValueHead):
        self.head = head

    def count(self, batch: Batch) -> int:
        return int(batch["num_sequences"]) // 2

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        chosen, rejected = halves(sequence_scores(model, self.head, batch))
        losses = pairwise_reward_loss(chosen, rejected)
        metrics = pair_metrics(chosen, rejected)
        metrics["accuracy"] = metrics.pop("rewards/accuracy")
        return losses.sum(), metrics

    def save(self, model: nn.Module, run_dir: Path) -> None:
        save_value_head(self.head, run_dir)


def reward_model_objective(cfg: "RunConfig", method: "Method", model: nn.Module, tokenizer: Any) -> Objective:
    """Attaches the value head to ``model`` before the optimizer is built, so it trains and is
    checkpointed with the method."""
    return RewardModelObjective(attach_value_head(model))


STAGE = StageSpec(
    name="rm",
    summary="reward model: a scalar head trained to score chosen answers above rejected ones",
    records=(Preference,),
    needs="preference pairs (chosen/rejected)",
    encoder=encode_preference,
    trainer=Trainer,
    objective=reward_model_objective,
    metrics=("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "accuracy"),
)
