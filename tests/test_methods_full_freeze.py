"""Full and freeze fine-tuning on the tiny Llama: what trains, what is saved, what is refused."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.methods.freeze import matches
from tunelab.testing.tiny import tiny_llama

# The helpers live in the PEFT test module (pytest puts tests/ on sys.path).
from test_methods_peft import (batch, changed_keys, logits_of, make_method, max_diff, snapshot, train_steps,
                               trainable_keys)


@pytest.fixture
def ids(tokenizer) -> torch.Tensor:
    return batch(len(tokenizer))


def test_full_trains_every_weight_and_round_trips(tokenizer, ids, tmp_path):
    method = make_method("full")
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    before = snapshot(model)
    losses = train_steps(method, model, ids)
    assert losses[1] < losses[0]
    assert changed_keys(before, snapshot(model)) == set(before) == trainable_keys(model)
    trained = logits_of(model, ids)
    path = method.save(model, tmp_path)
    assert path == tmp_path / "model" and (path / "model.safetensors").is_file()
    loaded = method.load(tiny_llama(len(tokenizer), seed=0), tmp_path)
    assert max_diff(logits_of(loaded, ids), trained) < 1e-5
    assert not any(p.requires_grad for p in loaded.parameters())
    assert method.mergeable and method.merge(loaded) is loaded
    assert method.reference(model) is None  # the caller keeps a frozen copy instead
    out = loaded.generate(input_ids=ids[:1, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("name", ["full", "freeze"])
def test_init_from_continues_from_the_saved_model(name, tokenizer, ids, tmp_path):
    method = make_method(name, trainable_layers=1)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    train_steps(method, model, ids)
    method.save(model, tmp_path)
    resumed = make_method(name, trainable_layers=1, init_from=str(tmp_path)).apply(
        tiny_llama(len(tokenizer), seed=1), tokenizer)
    assert max_diff(logits_of(resumed, ids), logits_of(model, ids)) < 1e-5
    assert trainable_keys(resumed) == trainable_keys(model)


def test_freeze_trains_only_the_last_layers_and_named_modules(tokenizer, ids, tmp_path):
    method = make_method("freeze", trainable_layers=1, trainable_modules=["norm"])
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    before = snapshot(model)
    losses = train_steps(method, model, ids)
    assert losses[1] < losses[0]
    changed = changed_keys(before, snapshot(model))
    assert changed == trainable_keys(model)
    assert changed == {k for k in before if k.startswith("model.layers.1.")} | {"model.norm.weight"}
    path = method.save(model, tmp_path)
    assert (path / "config.json").is_file()
    loaded = method.load(tiny_llama(len(tokenizer), seed=0), tmp_path, trainable=True)
    assert max_diff(logits_of(loaded, ids), logits_of(model, ids)) < 1e-5
    assert trainable_keys(loaded) == changed  # reloading as trainable re-applies the selection
    out = loaded.generate(input_ids=ids[:1, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_freeze_lm_head_of_tied_model_trains_the_shared_embedding(tokenizer):
    model = make_method("freeze", trainable_layers=0, trainable_modules=["lm_head"]).apply(
        tiny_llama(len(tokenizer)), tokenizer)
    assert trainable_keys(model) == {"model.embed_tokens.weight", "lm_head.weight"}


def test_freeze_patterns_match_whole_name_parts():
    assert matches("norm", "model.norm")
    assert not matches("norm", "model.layers.0.input_layernorm")
    assert matches("*norm", "model.layers.0.input_layernorm")
    assert matches("self_attn.q_proj", "model.layers.3.self_attn.q_proj")
    assert not matches("self_attn.q_proj", "model.layers.3.self_attn.k_proj")


@pytest.mark.parametrize("overrides, message", [
    ({"trainable_layers": 3}, "has only 2 decoder layers"),
    ({"trainable_modules": ["no_such_module"]}, "pattern 'no_such_module' matches no module"),
    ({"trainable_layers": 0}, "trains nothing"),
])
def test_freeze_configuration_errors(tokenizer, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_method("freeze", **overrides).apply(tiny_llama(len(tokenizer)), tokenizer)


@pytest.mark.parametrize("name", ["full", "freeze"])
def test_quantized_base_is_refused(name, tokenizer):
    model = tiny_llama(len(tokenizer))
    model.is_loaded_in_4bit = True  # what transformers sets after a bitsandbytes 4-bit load
    with pytest.raises(ConfigError, match="quantized weights cannot be trained"):
        make_method(name).apply(model, tokenizer)


def test_loading_a_run_without_model_dir_is_explained(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="holds no full model"):
        make_method("full").load(tiny_llama(len(tokenizer)), tmp_path)
