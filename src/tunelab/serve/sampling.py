"""Choosing the next token of each row of a continuously batched decode step.

Why per row: rows of one batch come from different requests with their own temperature,
top-p and seed, and join or leave the batch at any step. Each sampled row therefore draws
from a ``torch.Generator`` of its own, so a seeded request gets the same answer whatever
else happens to be generated beside it. Greedy rows take the argmax, exactly as
``generate`` does with ``do_sample=False``.
"""

from __future__ import annotations

import secrets

import torch

from tunelab.inference import GenerationOptions

_SEED_SPACE = 2 ** 64
#: Spreads the choices of one seeded request (n > 1) over unrelated generator seeds.
_CHOICE_STRIDE = 0x9E3779B97F4A7C15


def row_seed(seed: int | None, choice: int) -> int:
    """The generator seed of choice ``choice`` of a request: random without a seed, else derived from it."""
    if seed is None:
        return secrets.randbits(64)
    return (seed + choice * _CHOICE_STRIDE) % _SEED_SPACE


class TokenChooser:
    """How one row picks its tokens: argmax, or sampling with its own generator."""

    def __init__(self, options: GenerationOptions, choice: int, device: torch.device):
        sample = options.do_sample if options.do_sample is not None else options.temperature > 0
        self.greedy = not sample
        self.temperature = max(options.temperature, 1e-5)
        self.top_p = options.top_p
        self.top_k = options.top_k
        self.generator: torch.Generator | None = None
        if sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(row_seed(options.seed, choice))

    def sample(self, logits: torch.Tensor) -> int:
        """A token drawn from ``logits`` ([vocab], fp32) after temperature, top-k and top-p."""
        scores = logits / self.temperature
        if 0 < self.top_k < scores.numel():
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # Drop a token once the tokens ranked above it already hold top_p of the mass; the first stays.
            outside = (torch.cumsum(probs, dim=-1) - probs) > self.top_p
            scores = scores.index_fill(0, order[outside], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, choosers: list[TokenChooser]) -> list[int]:
    """The next token of every row of ``logits`` ([rows, vocab], fp32)."""
    greedy = logits.argmax(dim=-1).tolist()
    return [token if chooser.greedy else chooser.sample(logits[i])
            for i, (token, chooser) in enumerate(zip(greedy, choosers))]
