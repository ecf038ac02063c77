"""Reward functions for RL with verifiable rewards, in TRL's calling convention.

A reward function is called with keyword arguments only::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list[float | None]

one entry per completion, where ``columns`` are the dataset's other columns as lists aligned
with the completions (a ``solution`` column arrives as ``solution=[...]``). ``prompts`` and
``completions`` are strings, or in conversational form message lists
(``[{"role": "assistant", "content": "..."}]``); the built-ins accept both. This is the
convention of TRL's GRPO trainer, so reward functions users already have work unchanged
(declare ``**kwargs`` to ignore what you do not use). ``None`` marks "not applicable"
(a math reward on a coding prompt): that function is left out of the weighted sum for that
completion.

Built-ins: ``accuracy`` (the math answer checked against ``solution`` with the
``math-verify`` library), ``format`` (a regular expression), ``length`` (DAPO's soft
overlong penalty). Anything else is ``"module:function"`` (installed) or
``"path/to/file.py:function"``, resolved by :func:`tunelab.train.rewards.load_reward_fn`.
An entry may be a mapping that binds keyword arguments: ``{fn: format, pattern:
"^Answer: \\d+$"}``, with an optional ``name`` for the logs (default: the function's name).

A reward function that raises, or returns something other than one number (or None) per
completion, stops the run with a message naming it: a silently wrong reward trains the
wrong thing.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

from tunelab.errors import ConfigError, TunelabError
from tunelab.train.rewards import load_reward_fn

RewardFunc = Callable[..., Sequence[Union[float, None]]]
RewardEntry = Union[str, Mapping[str, Any]]

#: ``format``'s default: DeepSeek-R1's reasoning-then-answer layout.
DEFAULT_FORMAT = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string, a message, or a list of messages (the last one's)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        return completion_text(completion[-1])
    return ""


# ------------------------------------------------------------------------------ built-ins

def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError:
        raise TunelabError("reward 'accuracy' checks answers with the math-verify library, which is not installed. "
                           "Install it with `pip install 'tunelab[rl]'` (or `pip install math-verify`).") from None
    return math_verify


def _verify(gold_text: str, answer_text: str) -> float:
    """1.0 when ``answer_text``'s final answer equals ``gold_text`` mathematically.

    math-verify bounds its sympy work with ``signal.alarm``, which exists only in the main
    thread; elsewhere (a UI worker thread) it runs without a timeout.
    """
    mv = _math_verify()
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = mv.parse(gold_text, parsing_timeout=timeout)
    if not gold and "\\" in gold_text:  # bare LaTeX (\frac{1}{2}) is found only inside math delimiters
        gold = mv.parse(f"${gold_text}$", parsing_timeout=timeout)
    if not gold:  # not mathematics: compare the text
        return float(answer_text.strip() == gold_text.strip())
    answer = mv.parse(answer_text, parsing_timeout=timeout)
    return float(bool(answer) and mv.verify(gold, answer, timeout_seconds=timeout))


def accuracy(prompts: Sequence[Any], completions: Sequence[Any], solution: Sequence[Any] | None = None,
             **_: Any) -> list[float | None]:
    """1.0 for a completion whose final answer equals the ``solution`` column, else 0.0.

    Equality is mathematical (``1/2`` = ``0.5`` = ``\\frac{1}{2}``), judged by math-verify
    on the last answer it finds in the completion; a solution that is not mathematics is
    compared as stripped text. A missing solution (None) gives None: not applicable.
    """
    if solution is None:
        raise TunelabError("reward 'accuracy' needs a `solution` column in the dataset: the reference answer of "
                           "each prompt, which reaches reward functions as the keyword `solution`. Add it to the "
                           "data (or map it in dataset_info.json), or drop `accuracy` from grpo.reward_fns.")
    return [None if gold is None else _verify(str(gold), completion_text(c)) for c, gold in zip(completions, solution)]


def format_match(prompts: Sequence[Any], completions: Sequence[Any], pattern: str = DEFAULT_FORMAT,
                 **_: Any) -> list[float]:
    """1.0 when the completion matches ``pattern`` (``re.search``, ``.`` matching newlines too), else 0.0.

    Anchor the pattern (``^...$``) to demand that the whole completion has the format.
    """
    regex = re.compile(pattern, re.DOTALL)
    return [float(regex.search(completion_text(c)) is not None) for c in completions]


def length_penalty(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                   max_tokens: int, cache_tokens: int | None = None, **_: Any) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), in tokens.

    0 up to ``max_tokens - cache_tokens``, then falling linearly to -1 at ``max_tokens``
    (the generation limit: a completion that reaches it was cut off), -1 beyond. It tells
    the policy that answers near the limit are bad before they are truncated, instead of
    punishing truncation alone, which a cut-off but sound answer does not deserve.
    ``cache_tokens`` defaults to a quarter of ``max_tokens``.
    """
    cache = max(1, cache_tokens if cache_tokens is not None else max_tokens // 4)
    free = max_tokens - cache
    return [0.0 if len(ids) <= free else -1.0 if len(ids) > max_tokens else (free - len(ids)) / cache
            for ids in completion_ids]


BUILTINS: dict[str, RewardFunc] = {"accuracy": accuracy, "format": format_match, "length": length_penalty}


# ------------------------------------------------------------------------------ resolution

@dataclass
class NamedReward:
    """A reward function with the name it is logged under and its weight in the total."""

    name: str
    fn: RewardFunc
    weight: float


def _default_name(spec: str) -> str:
    """What a reward is logged as: a built-in's name, else the function's (``path/f.py:score`` -> ``score``)."""
    return spec.rpartition(":")[2]


def _entry_parts(entry: RewardEntry, where: str) -> tuple[str, str, dict[str, Any]]:
    """(function spec, log name, bound keyword arguments) of one ``grpo.reward_fns`` entry."""
    if isinstance(entry, str):
        return entry, _default_name(entry), {}
    if isinstance(entry, Mapping) and isinstance(entry.get("fn"), str):
        params = {k: v for k, v in entry.items() if k not in ("fn", "name")}
        return entry["fn"], str(entry.get("name") or _default_name(entry["fn"])), params
    raise ConfigError(f"{where} = {entry!r}: an entry is a built-in name ({', '.join(BUILTINS)}), "
                      "'module:function', or a mapping {fn: ..., name: ..., <keyword>: <value>} binding "
                      "keyword arguments of the function.")


def _function(spec: str, where: str) -> RewardFunc:
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        raise ConfigError(f"{where} = {spec!r} is neither a built-in reward ({', '.join(BUILTINS)}) nor of the "
                          "form 'module:function' or 'path/to/file.py:function'.")
    return load_reward_fn(spec, setting=where)


def resolve_rewards(entries: Sequence[RewardEntry], weights: Sequence[float] | None, max_new_tokens: int,
                    field: str = "grpo.reward_fns") -> list[NamedReward]:
    """The reward functions named in the config, with their weights (1 each when ``weights`` is None).

    ``length``'s limit defaults to ``max_new_tokens``, the generation limit it guards.
    """
    if not entries:
        raise ConfigError(f"{field} is empty: name at least one reward function (a built-in: "
                          f"{', '.join(BUILTINS)}; or 'module:function').")
    if weights is not None and len(weights) != len(entries):
        raise ConfigError(f"{field} lists {len(entries)} functions but reward_weights has {len(weights)} values; "
                          "give one weight per function (or none: all 1).")
    rewards: list[NamedReward] = []
    for index, entry in enumerate(entries):
        where = f"{field}[{index}]"
        spec, name, params = _entry_parts(entry, where)
        fn = _function(spec, where)
        if fn is length_penalty:
            params.setdefault("max_tokens", max_new_tokens)
        if any(r.name == name for r in rewards):
            raise ConfigError(f"{where}: the name '{name}' is used twice, and rewards are logged by name. Give one "
                              "of them its own `name:` (entry {fn: ..., name: ...}).")
        bound = functools.partial(fn, **params) if params else fn
        rewards.append(NamedReward(name, bound, 1.0 if weights is None else float(weights[index])))
    return rewards


# ------------------------------------------------------------------------------ scoring

def _raised_at(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _reward_error(reward: NamedReward, problem: str) -> TunelabError:
    return TunelabError(f"reward function '{reward.name}' returned {problem}. A reward function must return one "
                        "number (or None: not applicable) per completion, in order.")


def _as_float(value: Any) -> float:
    """``value`` as a finite float, NaN for None (not applicable); raises ValueError otherwise."""
    if value is None:
        return math.nan
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _checked(reward: NamedReward, values: Any, count: int) -> list[float]:
    """The function's values as floats with NaN for None; anything else is an error naming it."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable) or not hasattr(values, "__len__"):
        raise _reward_error(reward, f"a {type(values).__name__}")
    values = list(values)
    if len(values) != count:
        raise _reward_error(reward, f"{len(values)} values for {count} completions")
    out = []
    for index, value in enumerate(values):
        try:
            out.append(_as_float(value))
        except (TypeError, ValueError):
            raise _reward_error(reward, f"{value!r:.60} for completion {index}") from None
    return out


def score_rewards(rewards: Sequence[NamedReward], prompts: Sequence[Any], completions: Sequence[Any],
                  completion_ids: Sequence[Sequence[int]], columns: Mapping[str, Sequence[Any]]) -> torch.Tensor:
    """Call every reward function; returns fp32 ``[N, F]`` with NaN where a function gave None."""
    count = len(completions)
    table = []
    for reward in rewards:
        try:
            values = reward.fn(prompts=list(prompts), completions=list(completions),
                               completion_ids=[list(ids) for ids in completion_ids], **columns)
        except TunelabError:
            raise
        except Exception as err:
            raise TunelabError(f"reward function '{reward.name}' raised {type(err).__name__}: {err}"
                               f"{_raised_at(err)}. Fix the function (it is called as fn(prompts=..., "
                               "completions=..., completion_ids=..., **dataset_columns)) or remove it from "
                               "grpo.reward_fns.") from err
        table.append(_checked(reward, values, count))
    return torch.tensor(table, dtype=torch.float32).reshape(len(rewards), count).T.contiguous()


def total_reward(table: torch.Tensor, rewards: Sequence[NamedReward]) -> torch.Tensor:
    """Weighted sum per completion over the functions that applied (NaN = not applicable counts 0)."""
    weights = torch.tensor([r.weight for r in rewards], dtype=table.dtype, device=table.device)
    return torch.nansum(table * weights, dim=1)


def reward_metrics(table: torch.Tensor, rewards: Sequence[NamedReward]) -> dict[str, float]:
    """Mean and std of the total and of each function (over the completions it applied to)."""
    total = total_reward(table, rewards)
    metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std(unbiased=False))}
    for column, reward in zip(table.T, rewards):
        applied = column[~torch.isnan(column)]
        if len(applied):
            metrics[f"rewards/{reward.name}/mean"] = float(applied.mean())
            metrics[f"rewards/{reward.name}/std"] = float(applied.std(unbiased=False))
    return metrics
