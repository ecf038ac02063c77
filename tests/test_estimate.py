"""tunelab estimate: the memory model's terms on tiny models (no training)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from tunelab.config import build_config
from tunelab.data.records import Example
from tunelab.errors import ConfigError
from tunelab.estimate import Calibration, estimate, estimate_main, parse_target
from tunelab.estimate.formula import COMPACT_HEAP_CALIBRATION
from tunelab.estimate.measure import run_child
from tunelab.estimate.skeleton import build_meta_model, model_facts, quantized_bytes, weight_bytes
from tunelab.estimate.workload import shape_of
from tunelab.methods.base import count_parameters, get_method
from tunelab.testing.tiny import tiny_llama, tiny_llama_config
from tunelab.train.runtime import LONG_SEQUENCE_TOKENS

RECORDS = [{"instruction": f"Say the number {i} in words, please.", "input": "",
            "output": "The quick brown fox jumps over the lazy dog. " * (1 + i % 3)} for i in range(8)]


@pytest.fixture
def run_tree(tmp_path, tiny_model_dir):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    return {"model": {"name_or_path": str(tiny_model_dir)}, "method": {"type": "lora", "r": 4},
            "data": {"train": [str(data)], "max_length": 64},
            "train": {"batch_size": 2, "max_steps": 3}, "output_dir": str(tmp_path / "run")}


def config(tree, *overrides):
    # a deep copy: build_config's overrides write into the nested dicts they are given
    return build_config(copy.deepcopy(tree), list(overrides))


def cpu_estimate(tree, *overrides, target=None):
    return estimate(config(tree, *overrides), target or parse_target("cpu"), framework=0)


def test_breakdown_adds_up_to_the_total(run_tree):
    for target in (parse_target("cpu"), parse_target("cuda:24GB", 2, 2)):
        result = cpu_estimate(run_tree, target=target).to_dict()
        assert sum(result["breakdown"].values()) == result["predicted_peak_bytes"]
        assert result["breakdown"]["weights"] > 0 and result["breakdown"]["activations"] > 0


def test_tied_embeddings_are_counted_once(tokenizer):
    tied = build_meta_model(tiny_llama_config(len(tokenizer), tie_word_embeddings=True), torch.float32, "sdpa")
    untied = build_meta_model(tiny_llama_config(len(tokenizer), tie_word_embeddings=False), torch.float32, "sdpa")
    embedding = len(tokenizer) * 64 * 4
    assert weight_bytes(untied, "none", "nf4", True)["float32"] - weight_bytes(tied, "none", "nf4", True)["float32"] \
        == embedding
    assert weight_bytes(tied, "none", "nf4", True)["float32"] == 4 * count_parameters(tiny_llama(len(tokenizer)))[1]


def test_lora_trainable_count_matches_the_real_method(run_tree, tokenizer):
    cfg = config(run_tree, "method.target=all-linear", "method.r=4")
    facts = model_facts(cfg, tokenizer, torch.float32, total_steps=3)
    real = get_method(cfg.method).apply(tiny_llama(len(tokenizer)), tokenizer)
    assert facts.trainable_params == count_parameters(real)[0] > 0
    assert facts.first_grad_layer == 0


def test_freeze_keeps_activations_only_for_trained_layers(run_tree):
    tree = {**run_tree, "method": {"type": "freeze", "trainable_layers": 1}}
    frozen_below = cpu_estimate(tree).to_dict()
    assert frozen_below["model"]["layers_on_gradient_path"] == 1
    everything = cpu_estimate(tree, "method.type=full").to_dict()
    assert frozen_below["breakdown"]["activations"] < everything["breakdown"]["activations"]


def test_gradient_checkpointing_lowers_activations(run_tree):
    plain = cpu_estimate(run_tree).to_dict()["breakdown"]
    checkpointed = cpu_estimate(run_tree, "train.gradient_checkpointing=true").to_dict()["breakdown"]
    assert checkpointed["activations"] < plain["activations"] / 3


def test_kernel_cache_counts_new_batch_shapes_in_bf16_only(run_tree):
    bf16 = cpu_estimate(run_tree, "train.precision=bf16", "data.packing=false", "data.pad_to_multiple_of=1")
    shapes = {(b.rows, b.width) for b in bf16.workload.batches}
    assert len(shapes) > 1
    rounded = cpu_estimate(run_tree, "train.precision=bf16", "data.packing=false", "data.pad_to_multiple_of=16")
    assert {b.width % 16 for b in rounded.workload.batches} == {0}
    per_shape = bf16.calibration.kernel_cache_bytes_per_shape
    assert bf16.to_dict()["breakdown"]["kernel_cache"] <= len(shapes) * per_shape + 1
    assert bf16.to_dict()["breakdown"]["kernel_cache"] >= per_shape - 1
    fp32 = cpu_estimate(run_tree, "train.precision=fp32", "data.packing=false").to_dict()["breakdown"]
    assert fp32["kernel_cache"] == 0


def test_zero_shards_weights_gradients_and_optimizer(run_tree):
    def terms(gpus, stage):
        est = cpu_estimate(run_tree, "method.type=full", "train.grad_accum=2",
                           target=parse_target("cuda:80GB", gpus, stage))
        return est.evaluate(est.calibration).terms, est.facts

    single, facts = terms(1, 0)
    zero1, _ = terms(4, 1)
    zero2, _ = terms(4, 2)
    zero3, _ = terms(4, 3)
    weights = sum(facts.weight_bytes.values())
    assert single["weights"] == weights and "gathered_layers" not in single
    assert zero3["weights"] == pytest.approx(weights / 4, abs=1)
    assert zero3["gathered_layers"] == 2 * facts.layer_weight_bytes < weights
    assert zero1["weights"] == zero2["weights"] == weights
    assert zero1["optimizer"] == pytest.approx(single["optimizer"] / 4, abs=1)
    assert zero1["gradients"] == single["gradients"] > 0
    assert zero2["gradients"] == pytest.approx(single["gradients"] / 4, abs=1)


def test_nf4_weights_are_an_eighth_of_fp32_plus_block_statistics(tokenizer):
    model = build_meta_model(tiny_llama_config(len(tokenizer), hidden_size=128, intermediate_size=256),
                             torch.float32, "sdpa")
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    with_dq = weight_bytes(model, "4bit", "nf4", True)["nf4"]
    without_dq = weight_bytes(model, "4bit", "nf4", False)["nf4"]
    assert with_dq / (4 * linear) == pytest.approx((0.5 + 1 / 64 + 4 / (64 * 256)) / 4, rel=1e-3)
    assert without_dq / (4 * linear) == pytest.approx((0.5 + 4 / 64) / 4, rel=1e-3)
    assert 1 / 8 < with_dq / (4 * linear) < without_dq / (4 * linear) < 1 / 7
    assert quantized_bytes(1000, "8bit", True, rows=10) == 1000 + 40


def test_qlora_counts_adapter_like_lora_on_a_4bit_base(run_tree):
    qlora = cpu_estimate(run_tree, "method.type=qlora").to_dict()
    lora = cpu_estimate(run_tree).to_dict()
    assert qlora["model"]["trainable_params"] == lora["model"]["trainable_params"]
    assert "nf4" in qlora["model"]["weights_by_kind"]
    assert qlora["breakdown"]["weights"] < lora["breakdown"]["weights"]
    assert any("plain LoRA" in note for note in qlora["notes"])


def test_qlora_counts_its_load_slack_and_a_saved_input_per_lora_layer(run_tree):
    """A bf16 QLoRA base keeps bf16 float parts; PEFT's quantized LoRA layers each save their own input."""
    qlora = cpu_estimate(run_tree, "method.type=qlora", "train.precision=bf16")
    lora = cpu_estimate(run_tree, "train.precision=bf16")
    assert qlora.precision.residual == lora.precision.residual == 2
    assert not qlora.facts.shared_linear_inputs and lora.facts.shared_linear_inputs
    quantized = sum(qlora.facts.frozen_linear_weights) * 2  # every base linear, in bf16 at load
    assert qlora.facts.quantized_float_bytes == quantized
    slack = qlora.breakdown.terms["quantization_slack"]
    assert slack == round(qlora.calibration.quantization_slack_factor * quantized)
    assert "quantization_slack" not in lora.breakdown.terms or lora.breakdown.terms["quantization_slack"] == 0
    # q/k/v and gate/up share one saved input under the fused LoRA forward, not under PEFT's
    assert qlora.breakdown.terms["activations"] > lora.breakdown.terms["activations"]


def test_packed_and_padded_batch_shapes():
    examples = [Example([1, 2, 3, 4], [-100, -100, 3, 4]), Example([5, 6], [5, 6])]
    packed, padded = shape_of(examples, packed=True), shape_of(examples, packed=False)
    assert (packed.rows, packed.width, packed.tokens) == (1, 6, 6)
    assert (padded.rows, padded.width, padded.positions) == (2, 4, 8)
    assert packed.supervised == padded.supervised == 3  # the first label of each example never counts
    assert packed.masked(True) and not shape_of(examples[:1], packed=True).masked(True)
    assert not padded.masked(False)  # right padding needs no mask under causal attention


def test_prefix_tuning_adds_key_value_prefix_to_every_layer(run_tree):
    prefix = cpu_estimate(run_tree, "method.type=prefix", "method.num_virtual_tokens=10",
                          "method.prefix_projection=false")
    assert prefix.facts.prefix_tokens == 10 and prefix.facts.first_grad_layer == 0
    assert prefix.to_dict()["model"]["trainable_params"] == 10 * 2 * 2 * 32  # tokens x layers x (k, v) x kv dim


def test_json_output_has_the_required_keys(run_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tunelab.estimate.core.framework_bytes", lambda: 300 * 2**20)
    file = tmp_path / "run.yaml"
    import yaml
    file.write_text(yaml.safe_dump(run_tree), encoding="utf-8")
    returned = estimate_main(str(file), ["train.batch_size=4"], "cpu", 1, 0, measure=False, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(returned))
    assert {"predicted_peak_bytes", "breakdown", "phase", "model", "peak_batch"} <= printed.keys()
    assert printed["breakdown"]["framework"] >= 300 * 2**20


def test_bad_targets_and_stages_are_explained(run_tree):
    with pytest.raises(ConfigError, match="tpu"):
        parse_target("tpu")
    with pytest.raises(ConfigError, match="--gpus"):
        parse_target("cpu", 4, 3)
    with pytest.raises(ConfigError, match="PPO"):
        cpu_estimate(run_tree, "stage=ppo")


def test_run_child_reports_the_child_peak_rss(tmp_path):
    code, peak, _ = run_child([sys.executable, "-c", "block = b'x' * (150 * 2**20)"], tmp_path / "log")
    assert code == 0
    assert 150 * 2**20 < peak < 250 * 2**20  # the child's own peak, not this test process's


def test_model_load_counts_the_mapped_checkpoint_only_when_it_is_converted(run_tree):
    """A bf16 run from fp32 files holds both while loading; an fp32 run reads the files as they are."""
    bf16 = cpu_estimate(run_tree, "train.precision=bf16")
    fp32 = cpu_estimate(run_tree, "train.precision=fp32")
    files = sum(f.stat().st_size for f in Path(run_tree["model"]["name_or_path"]).glob("*.safetensors"))
    assert bf16.weight_file_bytes == files > 0 and fp32.weight_file_bytes == 0
    loading = bf16.calibration.weight_file_fraction * files + sum(bf16.facts.weight_bytes.values())
    assert bf16.peak_bytes >= loading  # the load phase bounds the peak from below


def test_a_compact_heap_run_is_estimated_with_the_compact_heap_constants(run_tree):
    """A budgeted or long run trains on the compact C heap (train.compact_heap: auto), whose
    leftovers the glibc-heap constants would overcount: the budget would then turn down
    settings that fit."""
    glibc = cpu_estimate(run_tree, "train.precision=bf16", "train.compact_heap=false", "train.memory_budget=8GB")
    compact = cpu_estimate(run_tree, "train.precision=bf16", "train.compact_heap=true")
    assert glibc.calibration == Calibration() and compact.calibration == COMPACT_HEAP_CALIBRATION
    assert any("compact C heap" in note for note in compact.notes)
    assert not any("compact C heap" in note for note in glibc.notes)
    assert cpu_estimate(run_tree, "train.memory_budget=8GB").calibration == COMPACT_HEAP_CALIBRATION
    long = cpu_estimate(run_tree, f"data.max_length={LONG_SEQUENCE_TOKENS + 1}")
    assert long.calibration == COMPACT_HEAP_CALIBRATION
    # the heap terms follow the calibration: less slack, a smaller kernel-cache creep
    assert compact.breakdown.terms["allocator"] < glibc.breakdown.terms["allocator"]
    assert compact.breakdown.terms["kernel_cache"] < glibc.breakdown.terms["kernel_cache"]
    # there is no C heap to compact on a GPU
    gpu = cpu_estimate(run_tree, "train.compact_heap=true", target=parse_target("cuda:24GB"))
    assert gpu.calibration == Calibration()
