"""Generating with methods whose learned state is virtual tokens, not weights.

PEFT's prompt-learning methods -- prefix-tuning and P-tuning v2 (key/value prefixes in
every layer), prompt tuning and P-tuning (input embeddings), and MAM's prefix -- put
``num_virtual_tokens`` positions in front of every input. ``PeftModel.generate`` cannot be
used for them with transformers 5: PEFT 0.21 injects the prefix as ``past_key_values``,
while transformers' ``generate`` passes its own (empty) cache as ``cache``; the forward's
deprecation shim keeps ``cache`` and drops the prefix, so the answers are the base
model's. Prompt tuning and P-tuning fare no better: PEFT looks for the cache under the old
name, finds none, and prepends the virtual embeddings again at every decoding step.

So this module gives the virtual tokens the form they have in the attention: keys and
values at positions ``0..n-1`` that every real token attends to. Prefix methods learn
those keys and values directly; prompt methods learn input embeddings whose keys and values
follow from one forward pass of the base over them (causal attention: they never see the
real tokens, so computing them first is exact). The base then generates from that cache
with an attention mask that covers it -- transformers' own way to continue from a filled
cache -- so greedy, sampled and beam decoding work unchanged, and the prompt's positions
start after the virtual tokens, exactly as in the training forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: PEFT types whose prompt encoder yields per-layer keys and values (not input embeddings).
_KEY_VALUE_TYPES = ("PREFIX_TUNING",)


@dataclass
class GenerationTarget:
    """What ``generate`` runs on, and the virtual tokens every row of a batch starts from."""

    module: nn.Module
    #: Virtual tokens in front of every row (0: the model has none, or they are switched off).
    prefix_length: int = 0
    #: The PEFT model that holds them (None when ``prefix_length`` is 0).
    adapter: Any = None

    @torch.no_grad()
    def cache(self, rows: int) -> Any:
        """A fresh cache holding the virtual tokens' keys and values for ``rows`` identical rows."""
        from transformers import DynamicCache

        config = self.adapter.active_peft_config
        if getattr(config.peft_type, "value", config.peft_type) in _KEY_VALUE_TYPES:
            return self.adapter.get_prompt(batch_size=rows)  # the learned keys and values, as in training
        embeddings = self.adapter.get_prompt(batch_size=rows)
        cache = DynamicCache(config=self.module.config)
        dtype = self.module.get_input_embeddings().weight.dtype
        self.module(inputs_embeds=embeddings.to(dtype), cache=cache, use_cache=True)
        return cache

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``module.generate`` with the virtual tokens in front of every row: their keys and values
        in the cache, the attention mask covering them. Every generation goes through here, so no
        caller hands a prompt-learning model to ``PeftModel.generate`` (see the module docstring)."""
        if self.prefix_length:
            rows = input_ids.shape[0]
            attention_mask = torch.cat([attention_mask.new_ones(rows, self.prefix_length), attention_mask], dim=1)
            kwargs["cache"] = self.cache(rows * kwargs.get("num_beams", 1))
        return self.module.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def generation_target(model: nn.Module) -> GenerationTarget:
    """How to generate with ``model``: itself, or its base model from a virtual-token cache.

    An adapter switched off (``disable_adapter()``, as for ``eval --compare-base`` and the
    served base model) has no virtual tokens: its base generates alone.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel) or not model.active_peft_config.is_prompt_learning:
        return GenerationTarget(model)
    base = model.get_base_model()
    if not model.has_active_enabled_adapter:
        return GenerationTarget(base)
    return GenerationTarget(base, model.active_peft_config.num_virtual_tokens, model)
