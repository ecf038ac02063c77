"""Every method answers as it computes: the guard for every present and future method.

For each registered method type, one run is trained for a few steps through the real
trainer on a tiny model, and the greedy answers of every user-facing generation path --
``chat`` (streamed), ``predict`` (batched, left-padded), ``eval --task generation`` and the
server's transformers backend, and the RL stages' rollouts -- must equal a reference loop of plain forward passes
(no cache, one prompt at a time) on the same loaded run, and differ from what the base
model answers. A path that loses what the method learned (a key/value prefix dropped by
the generation cache, an adapter switched off, wrong positions after padding) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from tunelab.config import build_config
from tunelab.data.records import Message
from tunelab.evaluate.generation import generation_eval
from tunelab.inference import GenerationOptions, LoadedRun, encode_prompt, load_run, stream
from tunelab.methods import METHODS
from tunelab.predict import predict_records
from tunelab.testing.tiny import tiny_llama, tiny_tokenizer
from tunelab.train import run_stage
from tunelab.train.rollout import sample_rollout

CPU = torch.device("cpu")
NEW_TOKENS = 8
GREEDY = GenerationOptions(max_new_tokens=NEW_TOKENS, temperature=0.0, do_sample=False)
QUESTIONS = ["Who are you?", "What is the capital of France?", "Write a short poem about the sea."]
ANSWERS = ["I am Tuna, an assistant trained with tunelab.", "The capital of France is Paris.",
           "Waves fold silver into the shore."]
#: Keys each type needs beyond the shared ones (only keys that apply to that type).
EXTRA_KEYS = {
    "lora": {"r": 4}, "dora": {"r": 4}, "rslora": {"r": 4}, "pissa": {"r": 4}, "loraplus": {"r": 4},
    "qlora": {"r": 4}, "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1},
    "prefix": {"num_virtual_tokens": 4}, "ptuning_v2": {"num_virtual_tokens": 4},
    "prompt": {"num_virtual_tokens": 4}, "ptuning": {"num_virtual_tokens": 4}, "mam": {"num_virtual_tokens": 4},
}
#: Learning rates high enough that six steps change the greedy answers (default: 0.02).
#: Virtual tokens, key/value prefixes and IA3's scaling vectors move the logits slowest.
LEARNING_RATES = {"prefix": 0.2, "ptuning_v2": 0.2, "prompt": 0.2, "ptuning": 0.2, "mam": 0.2, "ia3": 0.1}
FUSED = ("houlsby", "pfeiffer")  # adapter_fusion mixes the adapters of these runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict[str, Path]:
    """A tiny base and a small chat file.

    Hidden size 128: the 4-bit CPU kernels of QLoRA need it. Weights drawn with 5x the
    usual spread: the default tiny model answers every prompt with the same token, which
    neither reveals a lost prefix nor lets input-side methods (prompt, IA3) change it.
    """
    root = tmp_path_factory.mktemp("parity")
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer), hidden_size=128, intermediate_size=256,
               initializer_range=0.1).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    data = root / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(QUESTIONS, ANSWERS)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"root": root, "base": root / "base", "data": data}


class Runs:
    """Trains each method type once, on first use, and keeps the run directory."""

    def __init__(self, workdir: dict[str, Path]):
        self.workdir = workdir
        self.dirs: dict[str, Path] = {}

    def __getitem__(self, method: str) -> Path:
        if method not in self.dirs:
            self.dirs[method] = self._train(method)
        return self.dirs[method]

    def _train(self, method: str) -> Path:
        keys = dict(EXTRA_KEYS.get(method, {}), type=method)
        if method == "adapter_fusion":
            keys["fusion_adapters"] = [str(self[name]) for name in FUSED]
        out = self.workdir["root"] / method
        cfg = build_config({
            "model": {"name_or_path": str(self.workdir["base"])}, "method": keys,
            "data": {"train": [str(self.workdir["data"])], "max_length": 64},
            "train": {"max_steps": 6, "batch_size": 3, "lr": LEARNING_RATES.get(method, 0.02),
                      "scheduler": "constant", "precision": "fp32", "seed": 0},
            "output_dir": str(out)})
        run_stage(cfg, progress=False)
        return out


@pytest.fixture(scope="module")
def runs(workdir) -> Runs:
    return Runs(workdir)


@pytest.fixture(scope="module")
def base(workdir) -> LoadedRun:
    return load_run(workdir["base"], device=CPU)


def conversations() -> list[list[Message]]:
    return [[Message("user", question)] for question in QUESTIONS]


@torch.no_grad()
def reference_answer(model: torch.nn.Module, loaded: LoadedRun, messages: list[Message]) -> str:
    """Greedy decoding by hand: the whole sequence through the model at every step, no cache.

    The answer ends at the tokenizer's eos (the tiny ChatML tokenizer's end of turn).
    """
    ids = encode_prompt(loaded, messages)
    answer: list[int] = []
    for _ in range(NEW_TOKENS):
        token = int(model(input_ids=torch.tensor([ids + answer])).logits[0, -1].argmax())
        if token == loaded.tokenizer.eos_token_id:
            break
        answer.append(token)
    return loaded.tokenizer.decode(answer, skip_special_tokens=True)


@pytest.fixture(scope="module")
def base_answers(base: LoadedRun) -> list[str]:
    return [reference_answer(base.model, base, messages) for messages in conversations()]


def served_answers(run: Path, questions: list[str]) -> list[str]:
    from fastapi.testclient import TestClient

    from tunelab.serve.app import build_engine, create_app

    engine = build_engine([str(run)], "transformers", device=CPU)
    answers = []
    with TestClient(create_app(engine)) as client:
        for question in questions:
            reply = client.post("/v1/chat/completions", json={
                "model": run.name, "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": NEW_TOKENS})
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["message"]["content"])
    return answers


def rollout_answers(loaded: LoadedRun, chats: list[list[Message]]) -> list[str]:
    """What the RL stages' rollouts sample, decoded greedily: the policy as it trained."""
    tokenizer = loaded.tokenizer
    greedy = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=[tokenizer.eos_token_id],
                              pad_token_id=tokenizer.pad_token_id)
    prompts = [SimpleNamespace(prompt_ids=encode_prompt(loaded, messages), prompt=messages) for messages in chats]
    return sample_rollout(loaded.model, prompts, tokenizer, greedy, CPU).responses


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_path_answers_like_the_trained_model(method, runs, base_answers):
    loaded = load_run(runs[method], device=CPU)
    chats = conversations()
    expected = [reference_answer(loaded.model, loaded, messages) for messages in chats]
    assert expected != base_answers, f"{method}: training did not change the greedy answers; the test proves nothing"
    assert sum(len(text) for text in expected) > 6, expected

    streamed = ["".join(stream(loaded, messages, GREEDY)) for messages in chats]
    assert streamed == expected, "chat (streamed)"
    pairs = [(messages, None) for messages in chats]
    predicted = [row["prediction"] for row in predict_records(loaded, pairs, GREEDY, batch_size=len(pairs))]
    assert predicted == [text.strip() for text in expected], "predict (batched)"
    scored = generation_eval(loaded, [(messages, "reference") for messages in chats], batch_size=2,
                             max_new_tokens=NEW_TOKENS)
    assert [row["prediction"] for row in scored.rows] == [text.strip() for text in expected], "eval generation"
    assert served_answers(runs[method], QUESTIONS) == expected, "serve (transformers backend)"
    assert rollout_answers(loaded, chats) == [text.strip() for text in expected], "RL rollouts (ppo, grpo)"


def test_every_method_type_is_covered():
    """A new method registers itself and is then checked above; its extra keys go in EXTRA_KEYS."""
    assert set(EXTRA_KEYS) <= set(METHODS)
    assert len(METHODS) >= 19

