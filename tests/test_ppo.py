"""PPO end to end on the tiny model: rule and reward-model rewards, saving, resume, errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import build_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.inference import load_run
from tunelab.methods import get_method
from tunelab.models.value_head import load_value_head, sequence_scores
from tunelab.testing.tiny import tiny_llama
from tunelab.train import run_stage
from tunelab.train.loop import train
from tunelab.train.ppo import check_ppo_config, scale_scores
from tunelab.train.rewards import ModelReward, build_reward, load_reward_fn
from tunelab.train.rollout import build_rollout
from tunelab.train.stages import get_stage

PROMPTS = ["Who are you?", "What is the capital of France?", "Write a short poem about the sea.",
           "Translate hello to French.", "What is 2 + 3?", "Tell me about the fox."]
METRIC_KEYS = {"step", "loss", "lr", "tokens_per_s", "reward_mean", "reward_std", "kl", "entropy", "clipfrac",
               "value_loss"}

REWARD_MODULE = '''
CALLS = []

def bangs(prompts, responses):
    CALLS.append((list(prompts), list(responses)))
    return [float(r.count("!")) + 0.1 * len(r.split()) for r in responses]

def wrong_length(prompts, responses):
    return [1.0]
'''


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": "An answer."}) + "\n" for q in PROMPTS))
    return path


@pytest.fixture
def reward_dir(tmp_path, monkeypatch):
    """A directory holding ppo_test_rewards.py as the current directory (relative reward_fn paths start there)."""
    (tmp_path / "ppo_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def ppo_cfg(tiny_model_dir, prompt_file, out, *overrides):
    tree = {"model": {"name_or_path": str(tiny_model_dir)}, "stage": "ppo",
            "method": {"type": "lora", "r": 4, "alpha": 8},
            "data": {"train": [str(prompt_file)], "max_length": 64},
            "train": {"precision": "fp32", "lr": 5e-3, "batch_size": 2, "max_steps": 3, "scheduler": "constant"},
            "ppo": {"reward_fn": "ppo_test_rewards.py:bangs", "rollout_batch_size": 4, "mini_batch_size": 2,
                    "ppo_epochs": 2, "max_new_tokens": 6},
            "output_dir": str(out)}
    return build_config(tree, list(overrides))


def test_ppo_rows_carry_the_metrics_its_stage_declares():
    assert METRIC_KEYS == {"step", "lr", "tokens_per_s"} | set(get_stage("ppo").metrics)


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_runs_end_to_end_with_a_rule_reward(tiny_model_dir, prompt_file, reward_dir):
    out = reward_dir / "run"
    result = run_stage(ppo_cfg(tiny_model_dir, prompt_file, out), progress=False)
    assert result.steps == 3 and not result.interrupted
    rows = metric_rows(out)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == METRIC_KEYS
        assert all(math.isfinite(row[key]) for key in METRIC_KEYS)
        assert row["entropy"] > 0 and 0 <= row["clipfrac"] <= 1
    prompts, responses = load_reward_fn("ppo_test_rewards.py:bangs").__globals__["CALLS"][0]
    assert len(prompts) == 4 and set(prompts) <= set(PROMPTS) and all(isinstance(r, str) for r in responses)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "value_head.safetensors").is_file()
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0, "the policy must train"
    loaded = load_run(out, device=torch.device("cpu"))  # the saved policy reloads like any LoRA run
    assert loaded.cfg.stage == "ppo"


def test_ppo_resume_matches_an_uninterrupted_run(tiny_model_dir, prompt_file, reward_dir):
    straight = reward_dir / "straight"
    run_stage(ppo_cfg(tiny_model_dir, prompt_file, straight, "train.max_steps=2", "train.save_every=1"),
              progress=False)
    cut = reward_dir / "cut"
    run_stage(ppo_cfg(tiny_model_dir, prompt_file, cut, "train.max_steps=1", "train.save_every=1"), progress=False)
    resumed = run_stage(ppo_cfg(tiny_model_dir, prompt_file, cut, "train.max_steps=2", "train.save_every=1"),
                        resume=True, allow_config_change=True, progress=False)
    assert resumed.steps == 2
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert [r["reward_mean"] for r in metric_rows(straight)] == [r["reward_mean"] for r in metric_rows(cut)]


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, tmp_path_factory):
    """A tiny reward model run (one step is enough: only its loading and scoring are tested)."""
    root = tmp_path_factory.mktemp("rm")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "chosen": "Happy to help!", "rejected": "No."}) + "\n"
                            for q in PROMPTS))
    cfg = build_config({"model": {"name_or_path": str(tiny_model_dir)}, "stage": "rm",
                        "method": {"type": "lora", "r": 2}, "data": {"train": [str(data)], "max_length": 64},
                        "train": {"precision": "fp32", "lr": 1e-2, "max_steps": 1}, "output_dir": str(root / "run")})
    train(cfg, progress=False)
    return root / "run"


def test_reward_adapter_scores_like_the_reward_run_and_leaves_the_policy_alone(tiny_model_dir, prompt_file,
                                                                              reward_run, tokenizer):
    cfg = ppo_cfg(tiny_model_dir, prompt_file, "unused", "ppo.reward_fn=null", f"ppo.reward_model={reward_run}")
    method = get_method(cfg.method)
    policy = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    ids = torch.tensor([[5, 6, 7, 8]])
    before = policy(input_ids=ids).logits
    reward = build_reward(cfg, policy)
    assert isinstance(reward, ModelReward)
    prompts, responses = [[5, 6, 7], [9, 10]], [[20, 21, 2], [30]]
    rollout = build_rollout(prompts, responses, tokenizer.pad_token_id, torch.device("cpu"), ["a", "b"], ["x", "y"])
    scores = reward.score(rollout, batch_size=1)

    rm = load_run(reward_run, device=torch.device("cpu"))
    head = load_value_head(reward_run, 64)
    expected = [float(sequence_scores(rm.model, head, {"input_ids": torch.tensor([p + r]),
                                                       "sequence_index": torch.zeros(1, len(p + r), dtype=torch.long),
                                                       "num_sequences": torch.tensor(1)}))
                for p, r in zip(prompts, responses)]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    assert policy.active_adapter == "default"
    torch.testing.assert_close(policy(input_ids=ids).logits, before)
    reward.release()
    assert "reward" not in policy.peft_config


def test_ppo_with_a_reward_model_saves_only_the_policy(tiny_model_dir, prompt_file, reward_run, tmp_path):
    out = tmp_path / "ppo"
    run_stage(ppo_cfg(tiny_model_dir, prompt_file, out, "ppo.reward_fn=null", f"ppo.reward_model={reward_run}",
                      "train.max_steps=1"), progress=False)
    assert [p.name for p in (out / "adapter").iterdir() if p.is_dir()] == []
    assert all(math.isfinite(v) for k, v in metric_rows(out)[0].items())


def test_reward_settings_are_checked(tiny_model_dir, prompt_file, reward_dir, tokenizer, model):
    with pytest.raises(ConfigError, match="exactly one reward.*neither is set"):
        build_reward(ppo_cfg(tiny_model_dir, prompt_file, "x", "ppo.reward_fn=null"), model)
    with pytest.raises(ConfigError, match="not of the form 'module:function'"):
        load_reward_fn("ppo_test_rewards.bangs")
    with pytest.raises(ConfigError, match="module 'no_such_rewards' cannot be imported"):
        load_reward_fn("no_such_rewards:score")
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        load_reward_fn("ppo_test_rewards.py:missing")
    with pytest.raises(ConfigError, match="method.dropout=0"):
        check_ppo_config(ppo_cfg(tiny_model_dir, prompt_file, "x", "method.dropout=0.1"))
    with pytest.raises(ConfigError, match="is a 'ppo' run, not a reward model"):
        out = reward_dir / "notrm"
        out.mkdir()
        (out / "config.yaml").write_text("stage: ppo\n")
        build_reward(ppo_cfg(tiny_model_dir, prompt_file, "x", "ppo.reward_fn=null", f"ppo.reward_model={out}"),
                     model)


def test_a_reward_function_with_the_wrong_output_is_reported(tiny_model_dir, prompt_file, reward_dir):
    cfg = ppo_cfg(tiny_model_dir, prompt_file, reward_dir / "bad", "ppo.reward_fn=ppo_test_rewards.py:wrong_length",
                  "train.max_steps=1")
    with pytest.raises(TunelabError, match="returned 1 scores for 4 responses"):
        run_stage(cfg, progress=False)


def test_score_whitening_keeps_the_mean_and_leaves_equal_scores_alone():
    scores = torch.tensor([0.0, 0.5, 0.5, 2.0])
    scaled = scale_scores(scores, whiten=True)
    assert float(scaled.mean()) == pytest.approx(float(scores.mean()), abs=1e-6)
    assert float(scaled.std()) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(scale_scores(torch.full((3,), 0.7), whiten=True), torch.full((3,), 0.7))
    assert scale_scores(scores, whiten=False) is scores
