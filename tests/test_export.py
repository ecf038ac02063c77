"""``tunelab export``: dtypes, GGUF files read back by transformers, chat templates, Modelfile, adapter-only."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from gguf import GGUFReader, dequantize
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.records import Message
from tunelab.data.templates import get_template
from tunelab.export.chat_template import exported_chat_template
from tunelab.export.gguf_file import write_gguf
from tunelab.export.gguf_vocab import gguf_vocab
from tunelab.inference import load_run

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
SYSTEM = "You are Tuna. Answer briefly."
CONVERSATION = [Message("user", "Who are you?"), Message("assistant", "I am Tuna."), Message("user", "What is 2+2?")]
TEXT = "The quick brown fox jumps over the lazy dog. Who are you? 12345 (x) + [y]"
runner = CliRunner()


def train_run(root: Path, base: Path, method: dict, **sections) -> Path:
    """A tiny run trained for a few steps through the command line."""
    config = root / f"{root.name}.yaml"
    tree = {"model": {"name_or_path": str(base)}, "method": method,
            "data": {"dataset_dir": str(FIXTURES), "train": ["identity"], "max_length": 64},
            "train": {"max_steps": 4, "batch_size": 2, "lr": 2e-2, "precision": "fp32"},
            "output_dir": str(root / "run")}
    for name, values in sections.items():
        tree[name].update(values)
    config.write_text(yaml.safe_dump(tree))
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "run"


def export(*args) -> str:
    result = runner.invoke(app, ["export", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("lora"), tiny_model_dir, {"type": "lora", "r": 4, "alpha": 8},
                     data={"system": SYSTEM})


@pytest.fixture(scope="module")
def merged_fp32(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    export(lora_run, "--out", out, "--dtype", "fp32")
    return out


def stored_dtypes(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {handle.get_slice(key).get_dtype() for key in handle.keys()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def greedy(model, ids, n=12):
    """Greedy tokens; the repetition penalty keeps a tiny model from repeating one token, so they say something."""
    out = model.generate(ids, max_new_tokens=n, do_sample=False, repetition_penalty=5.0,
                         attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------ dtypes

def test_default_dtype_is_the_bases_own_and_the_command_says_why(lora_run, tiny_model_dir, merged_fp32, tmp_path):
    bf16_base = shutil.copytree(tiny_model_dir, tmp_path / "bf16-base")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_base)
    run = shutil.copytree(lora_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(bf16_base)
    (run / "config.yaml").write_text(yaml.safe_dump(config))

    output = export(run, "--out", tmp_path / "default")
    assert "in bf16 (the base's own: its weights are stored in bf16)" in output
    assert stored_dtypes(tmp_path / "default") == {"BF16"}
    size = (tmp_path / "default" / "model.safetensors").stat().st_size
    assert size < 0.55 * (merged_fp32 / "model.safetensors").stat().st_size

    assert "in fp32 (the base's own: its weights are stored in fp32)" in export(lora_run, "--out", tmp_path / "fp32")
    assert "in fp16 (as asked with --dtype)" in export(lora_run, "--out", tmp_path / "fp16", "--dtype", "fp16")
    fp16 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(merged_fp32, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 50, 60, 2]])
    assert stored_dtypes(tmp_path / "fp16") == {"F16"}
    assert 0 < (logits(fp16, ids) - logits(reference, ids)).abs().max() < 2e-3


@pytest.mark.parametrize("flags, message", [
    (["--format", "onnx"], "--format onnx is not an export format"),
    (["--dtype", "int4"], "--dtype int4 is not an export dtype"),
    (["--gguf-type", "q8_0"], "--gguf-type and --ollama apply to GGUF exports: add --format gguf"),
    (["--format", "gguf", "--gguf-type", "q4_k"], "--gguf-type q4_k is not supported"),
    (["--format", "gguf", "--dtype", "bf16", "--gguf-type", "q8_0"], "both set the precision of the GGUF file"),
    (["--adapter-only", "--dtype", "bf16"], "--adapter-only copies the adapter as it was trained"),
])
def test_contradictory_or_unknown_flags_are_refused_before_loading(lora_run, tmp_path, flags, message):
    result = runner.invoke(app, ["export", str(lora_run), "--out", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ chat template

@pytest.mark.parametrize("name", ["auto", "chatml", "llama3", "alpaca"])
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_exported_chat_template_renders_as_the_run_was_trained(tokenizer, name, system):
    template = get_template(name, tokenizer, system=system)
    jinja = exported_chat_template(template)
    chat = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    for messages, generation_prompt in ((chat, True), (chat[:2], False),
                                        ([{"role": "system", "content": "Own system."}, *chat], True)):
        expected = template.render([Message(m["role"], m["content"]) for m in messages], generation_prompt)
        assert tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                             add_generation_prompt=generation_prompt) == expected


def test_the_safetensors_export_carries_the_training_template_and_system(lora_run, merged_fp32):
    loaded = load_run(lora_run, device=torch.device("cpu"))
    exported = AutoTokenizer.from_pretrained(merged_fp32)
    rendered = exported.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert rendered == loaded.render_prompt([Message("user", "Hi")]) and SYSTEM in rendered


# ------------------------------------------------------------------------------ GGUF

@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2)])
def test_gguf_file_read_by_transformers_matches_the_safetensors_export(lora_run, merged_fp32, tmp_path, gguf_type,
                                                                         tolerance):
    output = export(lora_run, "--out", tmp_path, "--format", "gguf", "--gguf-type", gguf_type)
    name = f"run-{gguf_type}.gguf"
    assert f"GGUF file {tmp_path / name} written in {gguf_type}" in output
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(merged_fp32, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_fp32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=name)
    assert gguf_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.eos_token == "<|im_end|>"
    ids = prompt_ids(tokenizer)
    diff = (logits(from_gguf, ids) - logits(reference, ids)).abs().max()
    assert 0 < diff < tolerance
    tokens = greedy(reference, ids)
    assert greedy(from_gguf, ids) == tokens and len(set(tokens)) > 3


def test_gguf_default_type_follows_the_base_dtype_and_ollama_modelfile(lora_run, tmp_path):
    output = export(lora_run, "--out", tmp_path, "--format", "gguf", "--ollama")
    assert "written in f32 (the base's own: its weights are stored in fp32)" in output
    assert f"ollama create run -f {tmp_path / 'Modelfile'}" in output
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./run-f32.gguf\n")
    assert ('TEMPLATE """{{ range .Messages }}{{ if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}'
            '<|im_end|>\n{{ else if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n{{ else }}'
            '<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"""') in text
    assert f'SYSTEM """{SYSTEM}"""' in text and 'PARAMETER stop "<|im_end|>"' in text


def rope(x: torch.Tensor, pairs: str, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of x [T, heads, d] rotating (i, i + d/2) ("halves") or (2i, 2i + 1) ("adjacent")."""
    length, _, dim = x.shape
    angle = torch.arange(length)[:, None] * base ** (-torch.arange(dim // 2) * 2 / dim)  # [T, d/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = (x[..., :dim // 2], x[..., dim // 2:]) if pairs == "halves" else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.cat([ra, rb], -1) if pairs == "halves" else torch.stack([ra, rb], -1).flatten(-2)


def test_llama_query_key_rows_are_reordered_for_llama_cpps_adjacent_pair_rotation(merged_fp32, tmp_path):
    """Independent of transformers' reader: attention scores from the file's q/k weights with llama.cpp's
    rotation (adjacent pairs) equal those from the transformers weights with its rotation (halves)."""
    model = AutoModelForCausalLM.from_pretrained(merged_fp32, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged_fp32)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size, "<|im_end|>")
    write_gguf(model, vocab, tokenizer.chat_template, tmp_path / "m.gguf", "f32", "m")
    tensors = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()) for t in GGUFReader(
        str(tmp_path / "m.gguf")).tensors}
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    dim = model.config.hidden_size // heads
    x = torch.randn(7, model.config.hidden_size)
    attention = model.model.layers[0].self_attn

    def scores(wq, wk, pairs):
        q = rope((x @ wq.T).view(7, heads, dim), pairs)
        k = rope((x @ wk.T).view(7, kv_heads, dim), pairs).repeat_interleave(heads // kv_heads, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    expected = scores(attention.q_proj.weight, attention.k_proj.weight, "halves")
    from_file = scores(tensors["blk.0.attn_q.weight"], tensors["blk.0.attn_k.weight"], "adjacent")
    torch.testing.assert_close(from_file, expected, atol=1e-4, rtol=1e-4)
    as_is = scores(attention.q_proj.weight, attention.k_proj.weight, "adjacent")
    assert (as_is - expected).abs().max() > 0.1  # without the reordering the file would be wrong


def test_qwen2_is_written_without_reordering_and_reads_back(tokenizer, tmp_path):
    """Qwen2: llama.cpp rotates halves for it, and its q/k/v biases go into the file too."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config).eval()
    for name, param in model.named_parameters():  # random biases, so a dropped one would show
        if name.endswith("bias"):
            param.data.normal_(0, 0.5)
    vocab = gguf_vocab(tokenizer, config.vocab_size, "<|im_end|>")
    write_gguf(model, vocab, tokenizer.chat_template, tmp_path / "q.gguf", "f32", "qwen-tiny")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 50, 60, 2]])
    assert type(back).__name__ == "Qwen2ForCausalLM" and not back.config.tie_word_embeddings
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ adapter kept apart

def test_adapter_only_is_a_peft_directory_with_the_run_tokenizer(lora_run, tiny_model_dir, tmp_path):
    assert "adapter written to" in export(lora_run, "--out", tmp_path / "adapter", "--adapter-only")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    loaded = load_run(lora_run, device=torch.device("cpu"))
    ids = torch.tensor([[1, 40, 41, 42, 43, 50, 60, 2]])
    assert torch.equal(logits(plain, ids), logits(loaded.model, ids))
    rendered = AutoTokenizer.from_pretrained(tmp_path / "adapter").apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == loaded.render_prompt([Message("user", "Hi")])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("full"), tiny_model_dir, {"type": "full"},
                     train={"max_steps": 1, "lr": 1e-4})


def test_adapter_only_refuses_a_run_without_a_peft_adapter(full_run, tmp_path):
    result = runner.invoke(app, ["export", str(full_run), "--out", str(tmp_path / "a"), "--adapter-only"])
    assert result.exit_code == 2 and "method 'full', which keeps no PEFT adapter" in result.output


def test_damaged_full_run_weights_are_one_message_naming_the_file(full_run, tmp_path):
    run = shutil.copytree(full_run, tmp_path / "run")
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:math.ceil(weights.stat().st_size / 3)])
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"the model weights cannot be read: {weights}" in result.output
    assert f"Restore {run / 'model'} from a copy of the run" in result.output
