"""Run-time choices: precision and batch layout follow the hardware and the attention kernel."""

import pytest

from tunelab.train.runtime import packing_enabled, resolve_precision


@pytest.mark.parametrize("setting, attention, supports, expected", [
    ("auto", "sdpa", True, False),  # block mask would force materialised attention: pad instead
    ("auto", "flash_attention_2", True, True),  # varlen kernels: packing is padding-free and cheap
    (True, "sdpa", True, True),
    (False, "flash_attention_2", True, False),
    (True, "flash_attention_2", False, False),  # prompt learning cannot pack
])
def test_packing_follows_the_attention_kernel(setting, attention, supports, expected):
    assert packing_enabled(setting, attention, supports) is expected


def test_explicit_precision_is_kept():
    assert resolve_precision("fp32") == "no"
    assert resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("bf16_units, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_on_cpu_uses_bf16_only_with_bf16_units(monkeypatch, bf16_units, expected):
    import torch

    from tunelab.train import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: bf16_units)
    assert resolve_precision("auto") == expected


@pytest.mark.parametrize("name, mixed, trains_base, expected", [
    ("auto", "bf16", False, "bfloat16"),   # frozen base: computed in bf16 anyway, so stored in bf16
    ("auto", "bf16", True, "float32"),     # full/freeze: fp32 master weights
    ("auto", "no", False, "float32"),
    ("auto", "fp16", False, "float32"),    # fp16 activations of a bf16-trained base can overflow
    ("float16", "bf16", True, "float16"),  # an explicit model.dtype wins
])
def test_training_dtype(name, mixed, trains_base, expected):
    import torch

    from tunelab.models.loader import training_dtype

    assert training_dtype(name, mixed, trains_base) == getattr(torch, expected)


def test_trainer_loads_a_frozen_base_in_bf16_and_keeps_fp32_trainable_weights(tmp_path, monkeypatch):
    """Under bf16 autocast a LoRA run holds its base in bf16; full fine-tuning keeps fp32 master weights."""
    import torch

    from tunelab.config import build_config
    from tunelab.testing.tiny import save_tiny_model_dir
    from tunelab.train import runtime
    from tunelab.train.loop import Trainer

    monkeypatch.setattr(runtime, "resolve_precision", lambda precision: "bf16")
    model_dir = save_tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello there"}\n' * 4, encoding="utf-8")
    for method in ("lora", "houlsby", "prefix", "full"):
        cfg = build_config({"model": {"name_or_path": str(model_dir)}, "method": {"type": method},
                            "data": {"train": [str(data)], "max_length": 32}, "train": {"max_steps": 1},
                            "output_dir": str(tmp_path / method)})
        trainer = Trainer(cfg)
        params = list(trainer.model.named_parameters())
        assert {p.dtype for _, p in params if p.requires_grad} == {torch.float32}, method
        frozen = {p.dtype for _, p in params if not p.requires_grad}
        assert frozen == (set() if method == "full" else {torch.bfloat16}), method
        batch = trainer._collate([0, 1], trainer.data.train)
        assert batch["input_ids"].shape[1] == 32  # rounded up to 64, capped at max_length


@pytest.mark.parametrize("compute, dtype, expected", [
    ("auto", "bfloat16", "bfloat16"),  # a bf16-autocast QLoRA run computes its 4-bit matmuls in bf16
    ("auto", None, "float32"),         # inference on CPU: model.dtype auto -> fp32
    ("float32", "bfloat16", "float32"),  # an explicit model.compute_dtype wins
])
def test_4bit_compute_dtype_follows_the_training_dtype(compute, dtype, expected):
    pytest.importorskip("bitsandbytes")
    import torch

    from tunelab.config import ModelConfig
    from tunelab.models.loader import _quantization_config

    cfg = ModelConfig(quantization="4bit", compute_dtype=compute)
    quant = _quantization_config(cfg, torch.device("cpu"), getattr(torch, dtype) if dtype else None)
    assert quant.bnb_4bit_compute_dtype == getattr(torch, expected)
