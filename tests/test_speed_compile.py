"""train.compile: compiled decoder layers compute the same loss and gradients as eager ones."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.methods.lora_fused import fuse_lora_linears
from tunelab.testing.tiny import tiny_llama
from tunelab.train.compile import compile_decoder_layers

# aot_eager traces and partitions forward/backward exactly as inductor does, without building C++
# kernels, so the test stays fast; inductor's numerics are checked on the real job by the benchmarks.
BACKEND = "aot_eager"


def _lora_model(vocab: int, checkpointing: bool = False):
    model = get_peft_model(tiny_llama(vocab), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    fuse_lora_linears(model)
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_match_eager_loss_and_gradients(tokenizer, checkpointing):
    torch._dynamo.reset()
    vocab = len(tokenizer)
    eager, compiled = _lora_model(vocab, checkpointing), _lora_model(vocab, checkpointing)
    assert compile_decoder_layers(compiled, backend=BACKEND) == 2
    for width in (16, 24):  # a second padded width runs through the same dynamic graph
        ids = torch.randint(0, vocab, (2, width), generator=torch.Generator().manual_seed(width))
        loss_e, grads_e = _loss_and_grads(eager, ids)
        loss_c, grads_c = _loss_and_grads(compiled, ids)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys() and any("lora_A" in n for n in grads_c)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_model_without_declared_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="train.compile.*_no_split_modules"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_compile_must_be_a_boolean(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: x}\nmethod: {type: lora}\nstage: sft\ndata: {train: [d.jsonl]}\n"
                    "output_dir: out\n", encoding="utf-8")
    assert load_config(path).train.compile is False
    assert load_config(path, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match=r"run.yaml: key 'train.compile' = 'sometimes' is invalid"):
        load_config(path, ["train.compile=sometimes"])
