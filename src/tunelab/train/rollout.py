"""PPO rollouts: sample answers from the policy and lay them out for scoring and training.

Generation needs left padding (every prompt must end where its answer starts), but every
later pass (old log-probs, values, reference, reward model, the PPO updates) reads the
rollout as ``prompt + response`` rows with *right* padding: positions then count from 0
in every row exactly as in training, and no row ever starts with padding. Response-level
tensors are ``[N, R]`` (R = longest response, right-padded) as :mod:`rl_math` expects;
``positions[i, t]`` is the column of response token ``t`` of row ``i`` in the row layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig

from tunelab.config import PPOConfig
from tunelab.data.records import IGNORE_INDEX, PromptExample
from tunelab.inference import left_pad
from tunelab.models.forward import Batch
from tunelab.models.value_head import padded_sequence_index
from tunelab.virtual_tokens import generation_target


@dataclass
class Rollout:
    """Prompts with their sampled responses, as right-padded ``prompt + response`` rows."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T]: response tokens, -100 elsewhere
    positions: torch.Tensor  # [N, R]: column of each response token
    mask: torch.Tensor  # [N, R] bool: real response tokens
    prompts: list[str]
    responses: list[str]

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def rows(self, index: torch.Tensor) -> Batch:
        """A model batch of the selected rows, cut to their longest row, with the response
        positions (``positions``, ``response_mask``) and scoring keys (``sequence_index``)."""
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        mask = mask[:, :width]
        count = len(index)
        return {"input_ids": self.input_ids[index, :width], "attention_mask": mask,
                "position_ids": torch.arange(width, device=mask.device).expand(count, width),
                "labels": self.labels[index, :width],
                "positions": self.positions[index].clamp(max=width - 1), "response_mask": self.mask[index],
                "sequence_index": padded_sequence_index(mask),
                "num_sequences": torch.tensor(count)}


def generation_config(ppo: PPOConfig, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    """Sampling settings built from scratch, so the model's own generation defaults (a
    repetition penalty, say) cannot make the sampled distribution differ from the policy
    whose log-probs PPO optimises."""
    return GenerationConfig(do_sample=True, temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p,
                            max_new_tokens=ppo.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)


def _cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """The response up to and including its first stop token (the stop is an action too)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens


def _prompt_text(example: PromptExample, tokenizer) -> str:
    """What a reward function sees as the prompt: the last user message."""
    users = [m.content for m in example.prompt if m.role == "user"]
    return users[-1] if users else tokenizer.decode(example.prompt_ids, skip_special_tokens=True)


def build_rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device,
                  prompt_texts: list[str], response_texts: list[str]) -> Rollout:
    """Lay token ids of prompts and their responses out as a :class:`Rollout` (see the module docstring)."""
    count = len(prompts)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    longest = max(len(r) for r in responses)
    ids = torch.full((count, width), pad_id, dtype=torch.long)
    labels = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((count, width), dtype=torch.long)
    positions = torch.zeros((count, longest), dtype=torch.long)
    mask = torch.zeros((count, longest), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        start, end = len(prompt), len(prompt) + len(response)
        ids[row, :end] = torch.tensor(prompt + response)
        labels[row, start:end] = torch.tensor(response)
        attention[row, :end] = 1
        positions[row] = torch.arange(start, start + longest).clamp(max=width - 1)
        mask[row, :len(response)] = True
    return Rollout(ids.to(device), attention.to(device), labels.to(device), positions.to(device), mask.to(device),
                   prompt_texts, response_texts)


@torch.no_grad()
def sample_rollout(policy: nn.Module, examples: list[PromptExample], tokenizer, config: GenerationConfig,
                   device: torch.device) -> Rollout:
    """Generate one response per prompt with the policy (left-padded batch, sampling)."""
    encoded = left_pad([e.prompt_ids for e in examples], config.pad_token_id, device)
    output = generation_target(policy).generate(**encoded, generation_config=config)  # virtual tokens kept
    return rollout_from_samples(examples, output[:, encoded["input_ids"].shape[1]:].tolist(), tokenizer, config,
                                device)


def rollout_from_samples(examples: list[PromptExample], generated: list[list[int]], tokenizer,
                         config: GenerationConfig, device: torch.device) -> Rollout:
    """The rollout of sampled token ids, whichever engine sampled them: each response cut
    after its first stop token, decoded for the reward functions, laid out as rows."""
    stop_ids = set(config.eos_token_id)
    prompt_ids = [e.prompt_ids for e in examples]
    responses = [_cut_at_stop(tokens, stop_ids) for tokens in generated]
    texts = [tokenizer.decode([t for t in r if t not in stop_ids], skip_special_tokens=True).strip()
             for r in responses]
    return build_rollout(prompt_ids, responses, config.pad_token_id, device,
                         [_prompt_text(e, tokenizer) for e in examples], texts)
