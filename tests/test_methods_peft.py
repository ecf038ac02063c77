"""PEFT-backed methods (LoRA family, IA3, AdaLoRA, prompt learning) on the tiny Llama.

Every method is trained for two AdamW steps on one fixed batch, saved, and checked:
only its own parameters moved, the saved adapter reloads (through tunelab and through
plain PEFT) onto a fresh base with the same logits, merging preserves the logits,
generation works, the reference context gives back the untrained model, and
``init_from`` continues from exactly the saved weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from tunelab.config import MethodConfig, TrainConfig, build_config
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import Method, trainable_state
from tunelab.methods.lora import LORAPLUS_DEFAULT_RATIO, AdaLora
from tunelab.methods.prompts import TRAINABLE_FILE
from tunelab.testing.tiny import tiny_llama
from tunelab.virtual_tokens import generation_target

LORA_FAMILY = ["lora", "dora", "rslora", "pissa", "loraplus", "adalora", "ia3"]
PROMPT_METHODS = ["prefix", "prompt", "ptuning", "ptuning_v2"]
PEFT_METHODS = LORA_FAMILY + PROMPT_METHODS
#: Steps of every short training run; AdaLoRA's budget schedule is sized to it.
STEPS = 2


# ------------------------------------------------------------------ shared helpers

def batch(vocab_size: int) -> torch.Tensor:
    """The fixed batch every test trains and evaluates on (2 x 12 token ids)."""
    return torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def make_method(name: str, total_steps: int = STEPS, **overrides) -> Method:
    method = get_method(MethodConfig(type=name, **overrides))
    if isinstance(method, AdaLora):
        method.configure_schedule(total_steps)
    return method


def train_steps(method: Method, model: nn.Module, ids: torch.Tensor, steps: int = STEPS) -> list[float]:
    """``steps`` AdamW steps (lr 1e-2) on ``ids``; returns the loss before each step."""
    optimizer = torch.optim.AdamW(method.param_groups(model, TrainConfig(lr=1e-2)))
    model.train()
    losses = []
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        method.on_optimizer_step(model, step)
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def trainable_keys(model: nn.Module) -> set[str]:
    """State-dict keys backed by a trainable parameter (tied weights give several keys)."""
    pointers = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    return {k for k, v in model.state_dict().items() if v.data_ptr() in pointers}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ one trained run per method

@dataclass
class Trained:
    name: str
    method: Method
    model: nn.Module
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    losses: list[float]
    logits: torch.Tensor
    run_dir: Path


@pytest.fixture(scope="module", params=PEFT_METHODS)
def trained(request, tokenizer, tmp_path_factory) -> Trained:
    name = request.param
    ids = batch(len(tokenizer))
    method = make_method(name)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    before = snapshot(model)
    losses = train_steps(method, model, ids)
    run_dir = tmp_path_factory.mktemp(f"run-{name}")
    method.save(model, run_dir)
    return Trained(name, method, model, before, snapshot(model), losses, logits_of(model, ids), run_dir)


@pytest.fixture
def ids(tokenizer) -> torch.Tensor:
    return batch(len(tokenizer))


@pytest.fixture
def fresh_base(tokenizer) -> nn.Module:
    """An untouched copy of the base (same seed as the trained one)."""
    return tiny_llama(len(tokenizer), seed=0)


def test_training_moves_exactly_the_method_parameters(trained):
    assert isinstance(trained.model, PeftModel)
    assert trained.losses[1] < trained.losses[0]
    trainable = trainable_keys(trained.model)
    assert trainable, "the method made nothing trainable"
    # every trainable tensor moved, every frozen one (the whole base) is bit-identical
    assert changed_keys(trained.before, trained.after) == trainable


def test_saved_adapter_reloads_with_identical_logits(trained, fresh_base, ids):
    loaded = trained.method.load(fresh_base, trained.run_dir)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert max_diff(logits_of(loaded, ids), trained.logits) < 1e-5


def test_adapter_is_a_standard_peft_directory(trained, fresh_base, ids):
    loaded = PeftModel.from_pretrained(fresh_base, str(trained.run_dir / "adapter"))
    assert max_diff(logits_of(loaded, ids), trained.logits) < 1e-5


def test_merge_folds_the_adapter_into_plain_weights(trained, fresh_base, ids):
    assert trained.method.mergeable == (trained.name in LORA_FAMILY)
    if not trained.method.mergeable:
        with pytest.raises(ConfigError, match="virtual tokens"):
            trained.method.merge(trained.method.load(fresh_base, trained.run_dir))
        return
    merged = trained.method.merge(trained.method.load(fresh_base, trained.run_dir))
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in name or "ia3" in name for name, _ in merged.named_parameters())
    assert max_diff(logits_of(merged, ids), trained.logits) < 1e-4


def test_generate_works(trained, ids):
    # tunelab's generation target: PeftModel.generate drops prompt-learning prefixes (see virtual_tokens)
    out = generation_target(trained.model).generate(input_ids=ids[:1, :5],
                                                    attention_mask=torch.ones(1, 5, dtype=torch.long),
                                                    max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    assert torch.equal(out[0, :5], ids[0, :5])


def test_reference_is_the_untrained_model_without_a_copy(trained, fresh_base, ids):
    with trained.method.reference(trained.model) as ref:
        assert ref is trained.model
        assert max_diff(logits_of(ref, ids), logits_of(fresh_base, ids)) < 1e-5
    assert torch.equal(logits_of(trained.model, ids), trained.logits)


def test_init_from_continues_from_the_saved_weights(trained, tokenizer, ids):
    method = make_method(trained.name, init_from=str(trained.run_dir))
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    assert max_diff(logits_of(model, ids), trained.logits) < 1e-5
    if trained.name not in ("pissa", "adalora"):  # saved as rank 2r LoRA / with pruned ranks: other shapes
        resumed, saved = trainable_state(model), trainable_state(trained.model)
        assert resumed.keys() == saved.keys()
        assert all(torch.equal(resumed[k], saved[k]) for k in saved)
    before = snapshot(model)
    train_steps(method, model, ids, steps=1)
    assert changed_keys(before, snapshot(model)) == trainable_keys(model) != set()


# ------------------------------------------------------------------ errors of init_from

def test_init_from_refuses_an_adapter_of_another_family(tokenizer, tmp_path):
    prefix = make_method("prefix")
    prefix.save(prefix.apply(tiny_llama(len(tokenizer)), tokenizer), tmp_path)
    with pytest.raises(ConfigError, match="PREFIX_TUNING adapter.*'lora' trains LORA"):
        make_method("lora", init_from=str(tmp_path)).apply(tiny_llama(len(tokenizer)), tokenizer)


def test_init_from_a_directory_without_adapter_is_explained(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="holds no PEFT adapter"):
        make_method("dora", init_from=str(tmp_path)).apply(tiny_llama(len(tokenizer)), tokenizer)


def test_prompt_init_from_needs_the_tunelab_trainable_state(tokenizer, tmp_path):
    method = make_method("ptuning")
    method.save(method.apply(tiny_llama(len(tokenizer)), tokenizer), tmp_path)
    (tmp_path / "adapter" / TRAINABLE_FILE).unlink()
    with pytest.raises(ConfigError, match="tunelab_trainable.safetensors is missing"):
        make_method("ptuning", init_from=str(tmp_path)).apply(tiny_llama(len(tokenizer)), tokenizer)


@pytest.mark.parametrize("encoder_type", ["mlp", "lstm"])
def test_ptuning_resume_restores_the_whole_prompt_encoder(tokenizer, tmp_path, ids, encoder_type):
    method = make_method("ptuning", encoder_type=encoder_type, encoder_hidden_size=32)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    train_steps(method, model, ids)
    method.save(model, tmp_path)
    resumed = make_method("ptuning", init_from=str(tmp_path)).apply(tiny_llama(len(tokenizer)), tokenizer)
    saved, restored = trainable_state(model), trainable_state(resumed)
    head = "mlp_head" if encoder_type == "mlp" else "lstm_head"
    assert any(head in name for name in saved)  # the encoder itself, not only its output embeddings
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)


# ------------------------------------------------------------------ method-specific behaviour

def test_loraplus_gives_b_matrices_the_larger_learning_rate(tokenizer):
    train = TrainConfig(lr=1e-3, weight_decay=0.01)
    for name, extra, ratio in [("loraplus", {}, LORAPLUS_DEFAULT_RATIO),
                               ("lora", {"loraplus_lr_ratio": 4.0}, 4.0)]:
        method = make_method(name, **extra)
        model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
        slow, fast = method.param_groups(model, train)
        assert slow["lr"] == pytest.approx(1e-3) and fast["lr"] == pytest.approx(1e-3 * ratio)
        assert fast["weight_decay"] == slow["weight_decay"] == 0.01
        names = {id(p): n for n, p in model.named_parameters()}
        assert {names[id(p)].split(".")[-3] for p in fast["params"]} == {"lora_B"}
        assert {names[id(p)].split(".")[-3] for p in slow["params"]} == {"lora_A"}
    plain = make_method("lora")
    assert len(plain.param_groups(plain.apply(tiny_llama(len(tokenizer)), tokenizer), train)) == 1


def test_adalora_allocates_ranks_over_its_schedule_and_reloads(tokenizer, tmp_path, ids):
    total, modules = 8, 7 * 2  # all-linear: 7 projections in each of 2 layers
    method = make_method("adalora", total_steps=total, init_r=4, target_r=2, tinit=1, tfinal=2)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    train_steps(method, model, ids, steps=total)
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and len(pattern) == modules
    assert sum(sum(kept) for kept in pattern.values()) == 2 * modules  # pruned to the target budget
    method.save(model, tmp_path)
    loaded = method.load(tiny_llama(len(tokenizer)), tmp_path)
    assert max_diff(logits_of(loaded, ids), logits_of(model, ids)) < 1e-5
    merged = method.merge(method.load(tiny_llama(len(tokenizer)), tmp_path))
    assert max_diff(logits_of(merged, ids), logits_of(model, ids)) < 1e-4


def test_adalora_needs_its_schedule(tokenizer):
    with pytest.raises(ConfigError, match="configure_schedule"):
        get_method(MethodConfig(type="adalora")).apply(tiny_llama(len(tokenizer)), tokenizer)
    with pytest.raises(ConfigError, match="leave no steps"):
        make_method("adalora", total_steps=4, tinit=2, tfinal=2).apply(tiny_llama(len(tokenizer)), tokenizer)


def test_pissa_saves_a_plain_lora_relative_to_the_original_base(tokenizer, tmp_path, ids):
    method = make_method("pissa", r=4)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    original = tiny_llama(len(tokenizer))
    residual = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(residual, original.model.layers[0].self_attn.q_proj.weight)  # base was mutated
    train_steps(method, model, ids)
    trainable = trainable_keys(model)
    method.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # [B, B0] x [A; -A0]
    assert trainable_keys(model) == trainable  # saving left the training state alone
    on_original = PeftModel.from_pretrained(original, str(tmp_path / "adapter"))
    assert max_diff(logits_of(on_original, ids), logits_of(model, ids)) < 1e-5


def test_pissa_refuses_another_init():
    with pytest.raises(ConfigError, match="always uses init 'pissa'"):
        make_method("pissa", init="olora").peft_config(None, None)


def test_prompt_text_init_uses_the_token_embeddings(tokenizer):
    method = make_method("prompt", num_virtual_tokens=7, prompt_init_text="capital of France")
    base = tiny_llama(len(tokenizer))
    model = method.apply(base, tokenizer)
    text_ids = tokenizer("capital of France", add_special_tokens=False)["input_ids"]
    expected = base.get_input_embeddings().weight[torch.tensor((text_ids * 7)[:7])]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, expected)


@pytest.mark.parametrize("name", ["prefix", "ptuning_v2", "mam"])
def test_prefix_text_init_equals_writing_the_text_before_the_input(tokenizer, ids, name):
    """The initial key/value table is the base's own for the text, so the fresh model starts at
    exactly the base model reading text + input (positions continue after the prefix)."""
    text = "capital of France"
    method = make_method(name, num_virtual_tokens=6, prompt_init_text=text)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = torch.tensor((text_ids * 6)[:6]).expand(ids.shape[0], -1)
    expected = logits_of(tiny_llama(len(tokenizer)), torch.cat([prefix, ids], dim=1))[:, 6:]
    assert max_diff(logits_of(model, ids), expected) < 1e-5
    assert model.prompt_encoder["default"].embedding.weight.requires_grad


def _peft_and_fused(tokenizer, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """The same trained-looking LoRA model twice: PEFT's forward and the fused one."""
    from tunelab.methods.lora_fused import FusedLoraLinear

    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = make_method("lora", dropout=0.0).apply(tiny_llama(len(tokenizer)).to(dtype), tokenizer)
        with torch.no_grad():  # B starts at zero; give the update something to add
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
        for module in model.modules():
            if not fused and isinstance(module, FusedLoraLinear):
                module.__class__ = FusedLoraLinear.__mro__[1]  # back to PEFT's own Linear
        models.append(model)
    return models[0], models[1]


def _logits_and_grads(model: nn.Module, ids: torch.Tensor, autocast: bool):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    logits.logsumexp(-1).mean().backward()
    return logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_forward_matches_peft_in_fp32(tokenizer, ids):
    """Same logits and adapter gradients as PEFT's forward."""
    (peft_logits, peft_grads), (fused_logits, fused_grads) = [
        _logits_and_grads(model, ids, autocast=False) for model in _peft_and_fused(tokenizer, torch.float32)]
    assert max_diff(peft_logits, fused_logits) < 1e-5
    for name, grad in peft_grads.items():
        assert max_diff(grad, fused_grads[name]) < 1e-5 * max(1.0, float(grad.abs().max())), name


def test_fused_lora_forward_is_as_accurate_as_peft_under_bf16_autocast(tokenizer, ids):
    """On a bf16 base under autocast both round differently; the fused one (scaling on r
    numbers, one fp32-accumulated addmm) must be at least as close to the fp32 result."""
    reference, _ = _logits_and_grads(_peft_and_fused(tokenizer, torch.float32)[1], ids, autocast=False)
    errors = [max_diff(_logits_and_grads(model, ids, autocast=True)[0], reference)
              for model in _peft_and_fused(tokenizer, torch.bfloat16)]
    assert errors[1] <= 1.25 * errors[0], errors


def test_fused_lora_falls_back_where_it_cannot_fuse(tokenizer, ids):
    """A disabled adapter, a merged one, or a bf16 input to fp32 adapters without autocast use PEFT's path."""
    peft_model, fused_model = _peft_and_fused(tokenizer, torch.float32)
    with fused_model.disable_adapter(), peft_model.disable_adapter():
        assert torch.equal(logits_of(fused_model, ids), logits_of(peft_model, ids))
    bf16_peft, bf16_fused = _peft_and_fused(tokenizer, torch.bfloat16)
    assert torch.equal(logits_of(bf16_fused, ids), logits_of(bf16_peft, ids))  # PEFT casts the input itself
    expected = logits_of(fused_model, ids)
    fused_model.merge_adapter()
    assert max_diff(logits_of(fused_model, ids), expected) < 1e-4


def test_prompt_methods_declare_their_limits():
    assert not make_method("prefix").supports_gradient_checkpointing
    assert not make_method("ptuning_v2").supports_gradient_checkpointing
    assert make_method("prompt").supports_gradient_checkpointing
    assert not any(make_method(name).supports_packing for name in PROMPT_METHODS)
    assert all(make_method(name).supports_packing for name in LORA_FAMILY)
    with pytest.raises(ConfigError, match="'method.prefix_projection' does not apply to method.type 'ptuning_v2'"):
        build_config({"method": {"type": "ptuning_v2", "prefix_projection": True}})


def test_unknown_lora_target_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="method.target"):
        make_method("lora", target=["no_such_proj"]).apply(tiny_llama(len(tokenizer)), tokenizer)


# ------------------------------------------------------------------ QLoRA on a 4-bit CPU base

@pytest.fixture(scope="module")
def quantized_dir(tokenizer, tmp_path_factory) -> Path:
    """Hidden size 128: the 4-bit CPU kernels need blocks that 64 does not fill."""
    path = tmp_path_factory.mktemp("tiny-128")
    tiny_llama(len(tokenizer), hidden_size=128, intermediate_size=256).save_pretrained(path)
    return path


def load_4bit(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype)


@pytest.mark.parametrize("dtype, prepared", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_qlora_keeps_bf16_float_parts_and_upcasts_fp16_ones(quantized_dir, tokenizer, dtype, prepared):
    """bf16 parts are what a bf16-autocast run loads on purpose; fp16 ones would overflow."""
    pytest.importorskip("bitsandbytes")
    model = make_method("qlora").apply(load_4bit(quantized_dir, dtype), tokenizer)
    assert model.get_input_embeddings().weight.dtype == prepared
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_qlora_trains_on_a_4bit_base_and_merges_into_a_float_model(quantized_dir, tokenizer, ids, tmp_path):
    pytest.importorskip("bitsandbytes")
    method = make_method("qlora")
    model = method.apply(load_4bit(quantized_dir), tokenizer)
    before = snapshot(model)
    losses = train_steps(method, model, ids)
    assert losses[1] < losses[0]
    assert changed_keys(before, snapshot(model)) == trainable_keys(model)  # 4-bit base untouched
    # Compare in train mode (dropout is 0): in eval mode bitsandbytes' AVX512-BF16 CPU kernel
    # computes the 4-bit matmuls in bf16, which differs from any fp32 model by ~1e-3.
    model.train()
    unmerged = logits_of(model, ids)
    generated = model.generate(input_ids=ids[:1, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)
    method.save(model, tmp_path)
    merged = method.merge(model)
    assert not isinstance(merged, PeftModel) and not getattr(merged, "is_loaded_in_4bit", False)
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    assert merged.get_input_embeddings().weight.dtype == torch.float32
    # merged = dequant(W_nf4) + s*B*A in fp32: equal to the unmerged forward up to fp32 rounding
    assert max_diff(logits_of(merged, ids), unmerged) < 1e-4
    reloaded = method.load(load_4bit(quantized_dir), tmp_path).train()
    assert max_diff(logits_of(reloaded, ids), unmerged) < 1e-5


def test_qlora_gradients_survive_an_evaluation(quantized_dir, tokenizer, ids):
    """An eval-mode forward (train.eval_base, periodic evals, rollouts) must not change the
    gradients of the steps after it. bitsandbytes repacks a 4-bit weight for its AVX512-BF16
    inference kernel on the first eval forward on CPU, and that kernel has no backward: the
    base's 4-bit layers then passed no gradient back (relative gradient error ~1.0)."""
    pytest.importorskip("bitsandbytes")

    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = make_method("qlora").apply(load_4bit(quantized_dir), tokenizer)
        with torch.no_grad():  # B = 0 would leave the gradients of A, and of the base path, at zero
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}

    plain, after_eval = gradients(False), gradients(True)
    assert plain.keys() == after_eval.keys()
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_needs_a_4bit_base(tokenizer):
    with pytest.raises(ConfigError, match="model.quantization: 4bit"):
        make_method("qlora").apply(tiny_llama(len(tokenizer)), tokenizer)
