"""Stage grpo end to end on the tiny model: learning, metrics, the reward convention, resume, errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import GRPOConfig, build_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.inference import load_run
from tunelab.train import run_stage
from tunelab.train.grpo import check_grpo_config, clip_range, contiguous_head_input, scales_rewards
from tunelab.train.rewards import load_reward_fn
from tunelab.train.stages import get_stage

PROMPTS = ["Who are you?", "What is the capital of France?", "Write a short poem about the sea.",
           "Translate hello to French.", "What is 2 + 3?", "Tell me about the fox.", "Say hi.", "Count to three."]

REWARD_MODULE = '''
CALLS = []

def low_ids(prompts, completions, completion_ids, **kwargs):
    """Share of completion tokens among the 50 lowest ids (about 10% for the untrained model)."""
    return [sum(t < 50 for t in ids) / len(ids) for ids in completion_ids]

def record(prompts, completions, completion_ids, **kwargs):
    CALLS.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
    return [float(len(ids)) for ids in completion_ids]

def explode(prompts, completions, **kwargs):
    raise RuntimeError("the grader is down")
'''


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": f"Answer {i}."}) + "\n"
                            for i, q in enumerate(PROMPTS)))
    return path


@pytest.fixture
def reward_dir(tmp_path, monkeypatch):
    """The working directory, holding grpo_test_rewards.py (reward paths are relative to it)."""
    (tmp_path / "grpo_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def grpo_cfg(tiny_model_dir, prompt_file, out, *overrides, method=None):
    tree = {"model": {"name_or_path": str(tiny_model_dir)}, "stage": "grpo",
            "method": method or {"type": "lora", "r": 4, "alpha": 8},
            "data": {"train": [str(prompt_file)], "max_length": 64},
            "train": {"precision": "fp32", "lr": 1e-2, "batch_size": 8, "max_steps": 2, "scheduler": "constant"},
            "grpo": {"reward_fns": ["grpo_test_rewards.py:low_ids"], "prompts_per_step": 4, "num_generations": 4,
                     "max_new_tokens": 8},
            "output_dir": str(out)}
    return build_config(tree, list(overrides))


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_a_reward_the_tiny_model_can_learn(tiny_model_dir, prompt_file, reward_dir):
    """Full fine-tuning (the LM head trains): the share of rewarded tokens climbs within 20 steps."""
    out = reward_dir / "learn"
    run_stage(grpo_cfg(tiny_model_dir, prompt_file, out, "train.max_steps=20", method={"type": "full"}),
              progress=False)
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = (sum(r["reward_mean"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    assert first < 0.2 and last > first + 0.25, (first, last)
    assert rows[-1]["entropy"] < rows[0]["entropy"] - 0.5  # the policy sharpens onto the rewarded tokens
    declared = set(get_stage("grpo").metrics)
    for row in rows:
        assert declared <= set(row) and "kl" not in row  # beta = 0: no reference, no KL
        assert all(math.isfinite(row[key]) for key in declared)
        assert row["rewards/low_ids/mean"] == pytest.approx(row["reward_mean"])  # one function, weight 1
        assert 0 <= row["equal_reward_groups"] <= 1 and 0 <= row["completion_clipped"] <= 1
        assert 0 < row["completion_length"] <= 8
        assert row["clip_ratio"] == 0.0  # one update per batch: every ratio is exactly 1


def test_lora_run_with_kl_iterations_and_messages(tiny_model_dir, prompt_file, reward_dir):
    """beta > 0 (the adapter switched off is the reference), two updates per batch, conversational inputs."""
    out = reward_dir / "lora"
    run_stage(grpo_cfg(tiny_model_dir, prompt_file, out, "grpo.beta=0.1", "grpo.num_iterations=2",
                       "grpo.reward_inputs=messages", "grpo.loss=grpo", "grpo.epsilon=1e-4",
                       'grpo.reward_fns=["grpo_test_rewards.py:record", "grpo_test_rewards.py:low_ids"]',
                       "grpo.reward_weights=[0.5, 2.0]"), progress=False)
    rows = metric_rows(out)
    assert rows[0]["kl"] > 0 and rows[1]["kl"] > 0  # step 1's second update already differs from the reference
    assert rows[1]["clip_ratio"] > 0  # the second update of a batch sees ratios from the kept old log-probs
    for row in rows:
        total = 0.5 * row["rewards/record/mean"] + 2.0 * row["rewards/low_ids/mean"]
        assert row["reward_mean"] == pytest.approx(total)
    call = load_reward_fn("grpo_test_rewards.py:record").__globals__["CALLS"][0]
    assert len(call["completions"]) == 16 and len(call["prompts"]) == 16
    assert call["prompts"][0] == call["prompts"][3] != call["prompts"][4]  # groups of 4 share their prompt
    assert call["prompts"][0][-1]["role"] == "user" and call["prompts"][0][-1]["content"] in PROMPTS
    assert [m["role"] for m in call["completions"][0]] == ["assistant"]
    assert all(1 <= len(ids) <= 8 for ids in call["completion_ids"])
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0, "the policy must train"
    assert load_run(out, device=torch.device("cpu")).cfg.stage == "grpo"


def test_resume_matches_an_uninterrupted_run(tiny_model_dir, prompt_file, reward_dir):
    straight, cut = reward_dir / "straight", reward_dir / "cut"
    run_stage(grpo_cfg(tiny_model_dir, prompt_file, straight, "train.save_every=1"), progress=False)
    run_stage(grpo_cfg(tiny_model_dir, prompt_file, cut, "train.max_steps=1", "train.save_every=1"), progress=False)
    resumed = run_stage(grpo_cfg(tiny_model_dir, prompt_file, cut, "train.save_every=1"), resume=True,
                        allow_config_change=True, progress=False)
    assert resumed.steps == 2
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert [r["reward_mean"] for r in metric_rows(straight)] == [r["reward_mean"] for r in metric_rows(cut)]


def test_a_raising_reward_function_stops_the_run_naming_it(tiny_model_dir, prompt_file, reward_dir):
    out = reward_dir / "boom"
    cfg = grpo_cfg(tiny_model_dir, prompt_file, out, 'grpo.reward_fns=["grpo_test_rewards.py:explode"]')
    with pytest.raises(TunelabError, match=r"reward function 'explode' raised RuntimeError: the grader is down"):
        run_stage(cfg, progress=False)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "explode" in status["error"]


@pytest.mark.parametrize("overrides,message", [
    (["grpo.reward_fns=[]"], "needs grpo.reward_fns"),
    (["method.dropout=0.1"], "needs method.dropout=0"),
    (["train.grad_accum=2"], "train.grad_accum=2 has no meaning"),
])
def test_config_errors(tiny_model_dir, prompt_file, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_grpo_config(grpo_cfg(tiny_model_dir, prompt_file, tmp_path / "x", *overrides))


def test_loss_aware_defaults():
    assert clip_range(GRPOConfig(loss="grpo")) == (0.2, 0.2)
    assert clip_range(GRPOConfig(loss="dapo")) == (0.2, 0.28)  # DAPO's clip-higher
    assert clip_range(GRPOConfig(loss="gspo")) == (3e-4, 4e-4)  # GSPO's sequence-level ratio
    assert clip_range(GRPOConfig(loss="dapo", epsilon=0.1, epsilon_high=0.3)) == (0.1, 0.3)
    assert clip_range(GRPOConfig(loss="bnpo", epsilon=0.1)) == (0.1, 0.1)
    assert scales_rewards(GRPOConfig(loss="grpo")) and not scales_rewards(GRPOConfig(loss="dr_grpo"))
    assert scales_rewards(GRPOConfig(loss="dr_grpo", scale_rewards=True))


def test_generation_feeds_the_head_a_contiguous_input_and_samples_the_same(model, tokenizer):
    """The prefill's last-position slice reaches the head contiguous (no weight broadcast), same tokens."""
    head, seen = model.get_output_embeddings(), []

    def spy(module, args):
        seen.append(args[0].is_contiguous())

    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                  pad_token_id=0)
    handle = head.register_forward_pre_hook(spy)
    plain = model.generate(**kwargs)
    handle.remove()
    assert seen[0] is False  # what generate hands the head at the prefill: a strided slice
    seen.clear()
    with contiguous_head_input(model):
        handle = head.register_forward_pre_hook(spy)  # runs after the block's own hook
        fixed = model.generate(**kwargs)
        handle.remove()
    assert seen == [True] * 3
    torch.testing.assert_close(fixed, plain)
    assert not head._forward_pre_hooks  # the hook is gone after the block
