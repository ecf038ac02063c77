"""Reward functions in TRL's convention: built-ins, resolution from the config, checked scoring."""

import math

import pytest
import torch

from tunelab.errors import ConfigError, TunelabError
from tunelab.train.reward_fns import (accuracy, completion_text, format_match, length_penalty, resolve_rewards,
                                      reward_metrics, score_rewards, total_reward)

USER_MODULE = '''
CALLS = []

def echo_solution(prompts, completions, solution, **kwargs):
    CALLS.append(dict(prompts=prompts, completions=completions, solution=solution, **kwargs))
    return [float(c.strip() == s) for c, s in zip(completions, solution)]

def broken(prompts, completions, **kwargs):
    return [1.0 / 0 for _ in completions]

def short(prompts, completions, **kwargs):
    return [1.0]

def words(prompts, completions, **kwargs):
    return ["good" for _ in completions]

def nan(prompts, completions, **kwargs):
    return [float("nan") for _ in completions]

def maybe(prompts, completions, task, **kwargs):
    return [2.0 if t == "math" else None for t in task]
'''


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """A reward file in the working directory, named as ``grpo_user_rewards.py:function``."""
    (tmp_path / "grpo_user_rewards.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def msg(text):
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------- built-ins

def test_accuracy_checks_math_answers_in_either_completion_form():
    completions = ["7 + 5 = 12", "Answer: 13", msg("The result is 12."), "1/2", "hello"]
    solution = ["12", "12", "12", "0.5", "12"]
    assert accuracy([""] * 5, completions, solution=solution) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert accuracy([""] * 3, ["x", "Paris", "\\frac{2}{4}"], solution=[None, "Paris", r"\frac{1}{2}"]) == [
        None, 1.0, 1.0]  # None: not applicable; "Paris" is not math and is compared as text; bare LaTeX gold
    with pytest.raises(TunelabError, match="needs a `solution` column"):
        accuracy(["q"], ["12"])


def test_format_matches_a_regex():
    completions = ["<think>add</think> <answer>12</answer>", "<answer>12</answer>", msg("<think>a\nb</think><answer>1</answer>")]
    assert format_match([""] * 3, completions) == [1.0, 0.0, 1.0]
    assert format_match(["", ""], ["Answer: 12", "answer 12"], pattern=r"^Answer: -?\d+$") == [1.0, 0.0]


def test_length_is_dapo_soft_overlong_punishment():
    ids = [[0] * n for n in (10, 12, 14, 16, 17)]
    # L_max = 16, L_cache = 4: 0 up to 12 tokens, (12 - |y|) / 4 up to 16, -1 beyond.
    assert length_penalty([""] * 5, [""] * 5, completion_ids=ids, max_tokens=16, cache_tokens=4) == [
        0.0, 0.0, -0.5, -1.0, -1.0]
    assert length_penalty([""], [""], completion_ids=[[0] * 14], max_tokens=16) == [-0.5]  # cache = 16 // 4


def test_completion_text_reads_strings_messages_and_lists():
    assert completion_text("a") == "a"
    assert completion_text({"role": "assistant", "content": "b"}) == "b"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}]) == "c"


# ----------------------------------------------------------------------------- resolution

def test_resolve_builtins_bound_arguments_and_user_functions(user_rewards):
    rewards = resolve_rewards(["accuracy", {"fn": "format", "pattern": r"^\d+$", "name": "digits"}, "length",
                               "grpo_user_rewards.py:echo_solution"], [1.0, 0.5, 0.2, 2.0], max_new_tokens=8)
    assert [(r.name, r.weight) for r in rewards] == [("accuracy", 1.0), ("digits", 0.5), ("length", 0.2),
                                                     ("echo_solution", 2.0)]
    assert rewards[1].fn(prompts=[""], completions=["42"]) == [1.0]
    assert rewards[2].fn(prompts=[""], completions=[""], completion_ids=[[0] * 7]) == [-0.5]  # max_tokens = 8
    assert resolve_rewards(["format"], None, 8)[0].weight == 1.0


@pytest.mark.parametrize("entries,weights,message", [
    ([], None, "is empty"),
    (["accuracy", "format"], [1.0], "2 functions but reward_weights has 1"),
    (["acuracy"], None, "neither a built-in"),
    (["format", "format"], None, "used twice"),
    ([{"pattern": "x"}], None, "an entry is a built-in name"),
    (["no_such_module_xyz:fn"], None, r"grpo.reward_fns\[0\] = 'no_such_module_xyz:fn'.*cannot be imported"),
    (["missing.py:fn"], None, r"grpo.reward_fns\[0\] = 'missing.py:fn'.*does not exist"),
])
def test_resolve_errors_name_the_entry(entries, weights, message):
    with pytest.raises(ConfigError, match=message):
        resolve_rewards(entries, weights, max_new_tokens=8)


# ----------------------------------------------------------------------------- scoring

def test_columns_reach_functions_as_keyword_lists(user_rewards):
    rewards = resolve_rewards(["grpo_user_rewards.py:echo_solution"], None, 8)
    table = score_rewards(rewards, ["q1", "q2"], ["12", "7"], [[5, 6], [7]], {"solution": ["12", "8"], "id": [1, 2]})
    assert table.tolist() == [[1.0], [0.0]]
    call = rewards[0].fn.__globals__["CALLS"][-1]
    assert call == {"prompts": ["q1", "q2"], "completions": ["12", "7"], "solution": ["12", "8"], "id": [1, 2],
                    "completion_ids": [[5, 6], [7]]}


@pytest.mark.parametrize("fn,message", [
    ("broken", r"reward function 'broken' raised ZeroDivisionError.*grpo_user_rewards.py:9"),
    ("short", r"'short' returned 1 values for 2 completions"),
    ("words", r"'words' returned 'good' for completion 0"),
    ("nan", r"'nan' returned nan for completion 0"),
])
def test_bad_reward_functions_stop_the_run_naming_them(user_rewards, fn, message):
    rewards = resolve_rewards([f"grpo_user_rewards.py:{fn}"], None, 8)
    with pytest.raises(TunelabError, match=message):
        score_rewards(rewards, ["a", "b"], ["x", "y"], [[1], [2]], {})


def test_none_is_not_applicable_in_totals_and_metrics(user_rewards):
    rewards = resolve_rewards([{"fn": "format", "pattern": "^x$"}, "grpo_user_rewards.py:maybe"], [1.0, 0.5], 8)
    table = score_rewards(rewards, ["a", "b", "c"], ["x", "y", "x"], [[1], [2], [3]],
                          {"task": ["math", "code", "code"]})
    assert table[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert table[0, 1].item() == 2.0 and math.isnan(table[1, 1].item()) and math.isnan(table[2, 1].item())
    assert total_reward(table, rewards).tolist() == [2.0, 0.0, 1.0]  # 1 + 0.5 x 2; 0; 1 (None skipped)
    metrics = reward_metrics(table, rewards)
    assert metrics["reward_mean"] == pytest.approx(1.0)
    assert metrics["reward_std"] == pytest.approx(math.sqrt(2 / 3))
    assert metrics["rewards/format/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/maybe/mean"] == 2.0  # over the one completion it applied to
    assert metrics["rewards/maybe/std"] == 0.0


def test_tensor_and_tuple_returns_are_accepted():
    rewards = resolve_rewards(["format"], None, 8)
    rewards[0].fn = lambda **kw: torch.tensor([0.5, 1.0])
    assert score_rewards(rewards, ["a", "b"], ["x", "y"], [[1], [2]], {}).tolist() == [[0.5], [1.0]]
    rewards[0].fn = lambda **kw: (1, None)
    out = score_rewards(rewards, ["a", "b"], ["x", "y"], [[1], [2]], {})
    assert out[0, 0].item() == 1.0 and math.isnan(out[1, 0].item())


# ----------------------------------------------------------------------------- the example task

def load_example_rewards():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "grpo_rewards.py"
    spec = importlib.util.spec_from_file_location("grpo_example_rewards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parent / "data"


def test_example_task_answers_are_consistent_and_rewarded():
    import json

    module, data = load_example_rewards()
    for name in ("arith.json", "arith_eval.json"):
        for record in json.loads((data / name).read_text()):
            assert module.solve(record["instruction"]) == record["solution"], record
    prompts = ["What is 7 + 5? Reply with just the number."] * 4 + ["Compute 9 - 4."]
    completions = ["12", "7 + 5 = 12", "13", "The answer is twelve.", msg("5")]
    # correct (1.0) + 0.5 x number alone; PPO calls it positionally, GRPO by keyword
    assert module.arith_total(prompts, completions) == [1.5, 1.0, 0.5, 0.0, 1.5]
    assert module.arith_total(prompts=prompts, completions=completions, solution=["x"] * 5) == [1.5, 1.0, 0.5, 0.0, 1.5]
