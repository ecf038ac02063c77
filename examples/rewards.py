"""Rule rewards for the PPO example (``ppo.reward_fn: examples/rewards.py:friendly``).

A reward function takes the prompts (the last user message of each) and the sampled
responses, as text, and returns one float per response. tunelab loads it from the file
path named in the config (relative to the working directory); ``module:function`` names
an installed module instead, and a local file never shadows an installed one.
"""

from __future__ import annotations


def _friendly(response: str) -> float:
    """Upbeat answers score: 0.5 per exclamation mark (at most two) and 1 more for ending on one,
    the friendly closing ("Hope this helps!") that the chosen answers of ``pairs`` all have."""
    score = 0.5 * min(response.count("!"), 2)
    if response.rstrip().endswith("!"):
        score += 1.0
    return score


def friendly(prompts: list[str], responses: list[str]) -> list[float]:
    """The example's reward: rises as the policy learns an upbeat, exclamatory style."""
    return [_friendly(response) for response in responses]


def concise(prompts: list[str], responses: list[str], low: int = 5, high: int = 25) -> list[float]:
    """Length-in-range reward: 1 for answers of ``low``-``high`` words, falling linearly outside
    (0 at twice ``high`` words or at an empty answer)."""
    scores = []
    for response in responses:
        words = len(response.split())
        if words < low:
            scores.append(words / low)
        else:
            scores.append(max(0.0, 1.0 - max(0, words - high) / high))
    return scores
