"""Forward-pass helpers shared by training, evaluation and scoring: final hidden states.

The language-model head is applied by the caller, in chunks (see ``train.losses``): the
model runs with its output layer bypassed and returns hidden states, so the full
batch x length x vocabulary logits never exist at once. Evaluation (multiple choice),
reward scoring and every training objective read hidden states the same way, which is why
this lives below ``train/``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from tunelab.data.batching import model_inputs

#: A collated batch (see :mod:`tunelab.data.batching` for its keys).
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
    inputs = model_inputs(batch)
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning and config.peft_type != "PREFIX_TUNING":
        # Prompt tuning / P-tuning: PEFT numbers the positions itself (its virtual tokens come first)
        # and drops position ids, with a warning; the logits are the same without them.
        inputs.pop("position_ids", None)
    with output_head_bypassed(model) as head:
        out = model(**inputs)
    hidden = out.logits
    length = batch["input_ids"].shape[1]
    return hidden[:, -length:, :], head
