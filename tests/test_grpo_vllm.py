"""GRPO's vLLM rollouts: when they are chosen, what is refused, and the hand-over of the policy's
adapter each step, with a stand-in ``vllm`` (no GPU here; the stand-in records what tunelab asks
of vLLM and answers with fixed token ids)."""

import importlib.machinery
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import ConfigError, TunelabError
from tunelab.models import vllm_support
from tunelab.train import run_stage
from tunelab.train.grpo import check_grpo_config
from tunelab.train.vllm_rollout import rollout_backend

from test_grpo import grpo_cfg, metric_rows, prompt_file, reward_dir  # noqa: F401  (fixtures)

ANSWER_LENGTH = 3  # tokens before the stop


def fake_answer(row: int, stop: int) -> list[int]:
    """Differing answers within a group (ids below 50 or not: the low_ids reward), sampled past the stop."""
    return [7 if row % 2 else 60, 8 if row % 3 else 61, 62, stop, 5, 5]


class FakeLLM:
    made: list[dict] = []
    calls: list[dict] = []

    def __init__(self, **kwargs):
        FakeLLM.made.append(kwargs)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        weights = load_file(f"{lora_request.lora_path}/adapter_model.safetensors")
        FakeLLM.calls.append({"request": lora_request, "params": params, "prompts": prompts, "weights": weights})
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=fake_answer(row, params.stop_token_ids[0]))])
                for row in range(len(prompts))]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, number, path: types.SimpleNamespace(lora_name=name, lora_int_id=number,
                                                                           lora_path=path)
    for name, module in {"vllm": vllm, "vllm.lora": types.ModuleType("vllm.lora"),
                         "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(vllm_support, "cuda_visible", lambda: True)
    FakeLLM.made, FakeLLM.calls = [], []
    return FakeLLM


def test_auto_samples_with_transformers_without_vllm(tiny_model_dir, prompt_file, tmp_path):
    cfg = grpo_cfg(tiny_model_dir, prompt_file, tmp_path / "run")
    assert cfg.grpo.rollout_backend == "auto" and rollout_backend(cfg, 1) == "transformers"


def test_auto_takes_vllm_only_where_it_serves_the_run(tiny_model_dir, prompt_file, tmp_path, fake_vllm):
    cfg = grpo_cfg(tiny_model_dir, prompt_file, tmp_path / "run")
    assert rollout_backend(cfg, 1) == "vllm"
    assert rollout_backend(cfg, 2) == "transformers"
    dora = grpo_cfg(tiny_model_dir, prompt_file, tmp_path / "run", method={"type": "dora", "r": 4})
    assert rollout_backend(dora, 1) == "transformers"


@pytest.mark.parametrize("method, message", [
    ({"type": "dora", "r": 4}, "method.type=dora"),
    ({"type": "qlora", "r": 4}, "method.type=qlora"),
    ({"type": "full"}, "method.type=full"),
])
def test_explicit_vllm_refuses_what_it_cannot_sample(tiny_model_dir, prompt_file, tmp_path, method, message):
    cfg = grpo_cfg(tiny_model_dir, prompt_file, tmp_path / "run", "grpo.rollout_backend=vllm", method=method)
    with pytest.raises(ConfigError, match=message) as error:
        check_grpo_config(cfg)
    assert "grpo.rollout_backend: transformers" in str(error.value)


def test_explicit_vllm_without_vllm_says_how_to_get_on(tiny_model_dir, prompt_file, tmp_path):
    cfg = grpo_cfg(tiny_model_dir, prompt_file, tmp_path / "run", "grpo.rollout_backend=vllm")
    with pytest.raises(TunelabError, match="needs the vllm package.*grpo.rollout_backend: transformers"):
        check_grpo_config(cfg)


def test_each_step_hands_vllm_the_policy_it_is_about_to_update(tiny_model_dir, prompt_file, reward_dir, fake_vllm):
    out = reward_dir / "run"
    cfg = grpo_cfg(tiny_model_dir, prompt_file, out, "grpo.rollout_backend=vllm", "train.max_steps=3")
    run_stage(cfg)
    [made] = fake_vllm.made
    assert made["model"] == str(tiny_model_dir) and made["enable_lora"] and made["max_lora_rank"] == 8
    assert made["gpu_memory_utilization"] == 0.3
    calls = fake_vllm.calls
    assert [c["request"].lora_int_id for c in calls] == [1, 2, 3]  # a new id each step: vLLM reloads
    assert len({c["request"].lora_path for c in calls}) == 3
    assert all(len(c["prompts"]) == 16 and c["params"].temperature == cfg.grpo.temperature for c in calls)
    b_weights = [{k: v for k, v in c["weights"].items() if "lora_B" in k} for c in calls]
    assert all(float(w.abs().max()) == 0.0 for w in b_weights[0].values())  # LoRA starts at the base
    moved = [max(float((b_weights[i + 1][k] - b_weights[i][k]).abs().max()) for k in b_weights[0]) for i in range(2)]
    assert all(m > 0 for m in moved), "each step must sample from the weights the previous update left"
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(final[k], calls[-1]["weights"][k]) for k in final)  # the last update came after
    rows = metric_rows(out)
    assert [r["completion_length"] for r in rows if "completion_length" in r] == [ANSWER_LENGTH + 1] * 3
