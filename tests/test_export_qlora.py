"""Exporting a QLoRA run: what merging into dequantized weights gives, and the two exports users want."""

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from test_export import export, logits, stored_dtypes, train_run
from tunelab.inference import load_run

IDS = torch.tensor([[1, 40, 41, 42, 43, 50, 60, 70, 80, 2]])
runner = CliRunner()


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("qlora"), tiny_model_dir, {"type": "qlora", "r": 4, "alpha": 8})


@pytest.fixture(scope="module")
def merged(qlora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora-merged") / "fp32"
    output = export(qlora_run, "--out", out, "--dtype", "fp32")
    assert "merged into its dequantized 4-bit base" in output and "--adapter-only" in output
    return out


def four_bit_as_trained(run):
    """The 4-bit run as training computed it: in train mode from the start, bitsandbytes dequantizes each
    weight and multiplies in the compute dtype (in eval mode on CPU it switches to a bf16 kernel)."""
    loaded = load_run(run, device=torch.device("cpu"))
    return loaded.model.train()


def test_merged_weights_are_the_dequantized_base_plus_the_update(qlora_run, merged):
    model = four_bit_as_trained(qlora_run)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert update.abs().max() > 1e-3  # the adapter moved
    written = load_file(str(merged / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(written, base + update, atol=1e-6, rtol=0)


def test_merged_model_computes_what_the_4bit_model_did_not_the_float_base_plus_adapter(qlora_run, merged,
                                                                                       tiny_model_dir):
    exported = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    four_bit = four_bit_as_trained(qlora_run)
    float_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    float_plus_adapter = PeftModel.from_pretrained(float_base, qlora_run / "adapter").eval()
    to_4bit = (logits(exported, IDS) - logits(four_bit, IDS)).abs().max()
    to_float = (logits(float_plus_adapter, IDS) - logits(four_bit, IDS)).abs().max()
    assert to_4bit < 1e-4
    assert to_float > 100 * to_4bit  # the 4-bit base's quantization error, which the adapter was trained on


def test_merged_in_bf16_on_request(qlora_run, merged, tmp_path):
    assert "in bf16 (as asked with --dtype)" in export(qlora_run, "--out", tmp_path, "--dtype", "bf16")
    assert stored_dtypes(tmp_path) == {"BF16"}
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert 0 < (logits(bf16, IDS) - logits(fp32, IDS)).abs().max() < 2e-2
