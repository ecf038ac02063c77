"""What a training stage computes from a batch.

Every objective returns a loss *summed* over its units (supervised tokens for language
modelling, pairs for preference losses) plus the number of units, so the loop can divide
by the total over all micro-batches of an optimizer step: accumulated gradients then equal
the large-batch gradient exactly (token-level normalisation).

The language-model head is applied by us, in chunks (see ``losses.causal_lm_loss``): the
model runs with its output layer bypassed and returns hidden states, so the full
batch x length x vocabulary logits never exist at once.

This module holds the contract and causal LM; the sequence-level stages (rm, dpo, kto) are
in :mod:`tunelab.train.preference`, and PPO has its own rollout loop (:mod:`tunelab.train.ppo`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from tunelab.data.batching import model_inputs
from tunelab.errors import ConfigError
from tunelab.train.losses import causal_lm_loss

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.methods.base import Method

Batch = dict[str, torch.Tensor]


def _find_output_head(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute name, head) of the model's output embedding, through any wrapper."""
    head = model.get_output_embeddings()
    if head is None:
        raise RuntimeError(f"{type(model).__name__} has no output embedding layer")
    for name, module in model.named_modules():
        if module is head:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, head
    raise RuntimeError("output embedding layer not found among the model's modules")


@contextmanager
def output_head_bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model(...).logits`` are the final hidden states; yields the real head.

    Swapping the head for an identity works for every wrapper (PEFT LoRA, prompt learning,
    our adapters) without reimplementing their forward passes.
    """
    parent, attr, head = _find_output_head(model)
    setattr(parent, attr, nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def hidden_states(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, nn.Module]:
    """Final hidden states aligned with ``batch['input_ids']``, and the output head.

    Prompt-learning methods prepend virtual tokens; only the last T positions belong to
    the batch.
    """
    with output_head_bypassed(model) as head:
        out = model(**model_inputs(batch))
    hidden = out.logits
    length = batch["input_ids"].shape[1]
    return hidden[:, -length:, :], head


class Objective:
    """Base: a stage's loss over one micro-batch."""

    def count(self, batch: Batch) -> int:
        """Units in this micro-batch that the loss is summed over."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss summed over units, metrics summed over units) for one micro-batch."""
        raise NotImplementedError

    def save(self, model: nn.Module, run_dir: Path) -> None:
        """Write what the stage adds beyond the method's weights (a reward model's value head)."""


class CausalLMObjective(Objective):
    """Next-token cross-entropy on supervised tokens (stages ``pt`` and ``sft``)."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def count(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        hidden, head = hidden_states(model, batch)
        total, _ = causal_lm_loss(hidden, head, batch["labels"], self.chunk_size)
        return total, {}


def build_objective(cfg: "RunConfig", method: "Method", model: nn.Module, tokenizer: Any) -> Objective:
    """The objective of ``cfg.stage`` for the batch loop.

    Called after the method is applied and before the optimizer is built: a stage that adds
    trainable weights (the reward model's value head) attaches them to ``model`` here.
    """
    if cfg.stage in ("pt", "sft"):
        return CausalLMObjective(cfg.train.loss_chunk_size)
    if cfg.stage == "ppo":
        raise ConfigError("stage 'ppo' trains in its own rollout loop, not the batch loop: start it with "
                          "`tunelab train` (tunelab.train.run_stage), which dispatches it to train_ppo.")
    from tunelab.train.preference import build_sequence_objective  # imports this module

    return build_sequence_objective(cfg, method, model, tokenizer)
