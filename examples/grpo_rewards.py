"""Reward functions for the arithmetic task of examples/grpo.yaml (data: examples/data/arith.json).

They follow TRL's convention, ``fn(prompts, completions, **kwargs) -> list[float]``: the
dataset's other columns arrive as keyword lists, and ``**kwargs`` takes whatever a
function does not use. A config names a function of this file by its path, relative to the
current directory: ``examples/grpo_rewards.py:correct``.

``correct`` works the answer out from the question itself and checks the completion with the
built-in ``accuracy`` (math-verify), so it needs no answer column. ``arith_total`` is the
example's whole reward as one function (correct + 0.5 x the number alone): PPO's rule rewards
see only prompts and responses, so this is how PPO trains on the same task with the same
reward (``ppo.reward_fn: examples/grpo_rewards.py:arith_total``; PPO passes prompts and
responses positionally, which these signatures accept too).
"""

from __future__ import annotations

import re
from typing import Any

from tunelab.train.reward_fns import accuracy, format_match

#: The answer format the questions ask for: the number alone (the ``format`` reward's pattern).
NUMBER_ONLY = r"^\s*-?\d+\.?\s*$"
#: Weight of the format reward next to correctness (1.0), as in examples/grpo.yaml.
FORMAT_WEIGHT = 0.5
_QUESTION = re.compile(r"(\d+)\s*([+-])\s*(\d+)")


def solve(prompt: str) -> str:
    """The answer to the first ``a + b`` / ``a - b`` in ``prompt``, as text."""
    match = _QUESTION.search(prompt)
    if match is None:
        raise ValueError(f"no 'a + b' or 'a - b' question in prompt {prompt!r:.80}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return str(a + b if op == "+" else a - b)


def correct(prompts: list[str], completions: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's answer equals the question's (checked by math-verify), else 0.0."""
    return accuracy(prompts, completions, solution=[solve(p) for p in prompts])


def arith_total(prompts: list[str], completions: list[Any], **kwargs: Any) -> list[float]:
    """The example's weighted total as one function: correct + 0.5 x the number alone."""
    formatted = format_match(prompts, completions, pattern=NUMBER_ONLY)
    return [float(c) + FORMAT_WEIGHT * f for c, f in zip(correct(prompts, completions), formatted)]
