"""Defaults that do no harm, and honest reporting (issue 15, items 5 and 6), on the tiny Llama.

Virtual tokens start at the base reading a neutral text; ``prefix`` keeps its MLP
reparameterisation and so differs from ``ptuning_v2``; ``train.lr: auto`` resolves per method
family and stage and lands in the run's config.yaml; AdaLoRA's schedule scales with the run;
AdapterDrop counts only what trains and says what it drops; KTO logs its KL estimate unclamped; a paged optimizer on
CPU says that it runs unpaged.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tunelab.config import MethodConfig, TrainConfig, build_config, method_config_classes
from tunelab.data.batching import collate_unpaired
from tunelab.data.records import Example, UnpairedExample
from tunelab.errors import ConfigError
from tunelab.method_defaults import LR_FAMILY, RL_STAGES, SFT_LR, default_lr
from tunelab.methods import get_method
from tunelab.methods.base import count_parameters
from tunelab.methods.lora import AdaLora
from tunelab.methods.prompts import NEUTRAL_INIT_TEXT
from tunelab.runs import RunDir
from tunelab.testing.tiny import tiny_llama
from tunelab.train.loop import train
from tunelab.train.optim import build_optimizer
from tunelab.train.stages import build_objective

VIRTUAL_TOKEN_TYPES = ["prefix", "ptuning_v2", "mam", "prompt", "ptuning"]


def ids_batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the positions of ``ids`` (PEFT's input-side methods also return the virtual tokens')."""
    model.eval()
    return model(input_ids=ids).logits[:, -ids.shape[1]:].float()


def fresh(name: str, tokenizer, **keys):
    method = get_method(MethodConfig(type=name, **keys))
    torch.manual_seed(0)
    return method, method.apply(tiny_llama(len(tokenizer)), tokenizer)


# ------------------------------------------------------------------ virtual tokens start at the base's states

@pytest.mark.parametrize("name", VIRTUAL_TOKEN_TYPES)
def test_default_virtual_tokens_start_as_the_base_reading_the_neutral_text(tokenizer, name):
    """Step 0 of a default run computes what the base computes with NEUTRAL_INIT_TEXT written before
    the input, also through prefix's MLP and P-tuning's encoder. (How close that is to the bare
    base is a property of the real model and the text: measured in benchmarks/neutral_text.py.)"""
    ids = ids_batch(len(tokenizer))
    _, model = fresh(name, tokenizer)
    n = 20  # num_virtual_tokens' default
    text_ids = tokenizer(NEUTRAL_INIT_TEXT, add_special_tokens=False)["input_ids"]
    prefix = torch.tensor((text_ids * n)[:n]).expand(ids.shape[0], -1)
    base = tiny_llama(len(tokenizer))
    with_text = logits_of(base, torch.cat([prefix, ids], dim=1))[:, n:]
    torch.testing.assert_close(logits_of(model, ids), with_text, atol=2e-4, rtol=0)
    _, random_start = fresh(name, tokenizer, prompt_init_text=None)
    assert (logits_of(random_start, ids) - with_text).abs().max() > 1e-2  # the init is what made them equal


def test_prefix_and_ptuning_v2_defaults_differ(tokenizer):
    """Same start (the neutral text), different parameterisation: prefix trains an MLP that
    produces the table, ptuning_v2 the table itself, so one identical step moves them apart."""
    ids = ids_batch(len(tokenizer))
    moved = {}
    for name in ("prefix", "ptuning_v2"):
        method, model = fresh(name, tokenizer)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(".transform." in n for n in trainable) == (name == "prefix")
        start = logits_of(model, ids)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        moved[name] = (start, logits_of(model, ids))
    torch.testing.assert_close(moved["prefix"][0], moved["ptuning_v2"][0], atol=2e-4, rtol=0)
    assert (moved["prefix"][1] - moved["ptuning_v2"][1]).abs().max() > 1e-3


def test_empty_init_text_is_a_config_error_naming_the_key(tokenizer):
    with pytest.raises(ConfigError, match="prompt_init_text '' tokenizes to nothing.*null for a random start"):
        fresh("prompt", tokenizer, prompt_init_text="")


# ------------------------------------------------------------------ train.lr: auto

def test_lr_auto_resolves_per_family_and_stage():
    assert set(LR_FAMILY) == set(method_config_classes())  # every method has a measured family
    lr = {name: build_config({"method": {"type": name}}).train.lr for name in LR_FAMILY}
    assert lr == {name: SFT_LR[LR_FAMILY[name]] for name in LR_FAMILY}
    assert lr["full"] < lr["freeze"] < lr["lora"] < lr["adalora"] < lr["prompt"] == lr["ia3"]
    assert lr["dora"] == lr["qlora"] == lr["lora"] and lr["prefix"] < lr["ptuning_v2"]  # an MLP amplifies steps
    for stage in RL_STAGES:  # the RL stages keep their own, stage-aware rate
        assert build_config({"stage": stage, "method": {"type": "prompt"}}).train.lr == default_lr("prompt", stage)
        assert default_lr("full", stage) < default_lr("lora", stage)
    assert build_config({"stage": "dpo", "method": {"type": "full"}}).train.lr == lr["full"]
    explicit = build_config({"train": {"lr": 3e-3}})
    assert explicit.train.lr == 3e-3 and not explicit.train.lr_is_auto
    written = build_config({"train": {"lr": "auto"}}, ["method.type=ia3"])
    assert written.train.lr == lr["ia3"] and written.train.lr_is_auto


def train_one_step(tiny_model_dir, tmp_path, method: dict) -> RunDir:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": "I am Tuna."}) + "\n"
                            for i in range(4)))
    cfg = build_config({"model": {"name_or_path": str(tiny_model_dir)}, "method": method,
                        "data": {"train": [str(data)], "max_length": 48},
                        "train": {"precision": "fp32", "batch_size": 4, "max_steps": 1},
                        "output_dir": str(tmp_path / "run")})
    train(cfg, progress=False)
    return RunDir(tmp_path / "run")


def test_lr_auto_is_printed_and_written_into_config_yaml(tiny_model_dir, tmp_path):
    run = train_one_step(tiny_model_dir, tmp_path, {"type": "prompt"})
    saved = yaml.safe_load(run.config.read_text())["train"]["lr"]
    assert saved == SFT_LR[LR_FAMILY["prompt"]]
    assert f"peak lr {saved:g} (train.lr auto" in run.log.read_text()


# ------------------------------------------------------------------ AdaLoRA

def test_adalora_schedule_scales_with_the_run():
    method = get_method(MethodConfig(type="adalora"))
    assert isinstance(method, AdaLora)
    method.configure_schedule(50)
    assert method.schedule() == {"tinit": 5, "tfinal": 10, "deltaT": 3, "total_step": 50}
    method.configure_schedule(8)
    assert method.schedule() == {"tinit": 0, "tfinal": 1, "deltaT": 1, "total_step": 8}
    pinned = get_method(MethodConfig(type="adalora", tinit=2, deltaT=4))
    pinned.configure_schedule(50)
    assert pinned.schedule() == {"tinit": 2, "tfinal": 10, "deltaT": 4, "total_step": 50}


def test_adalora_default_schedule_prunes_to_its_budget_within_a_short_run(tokenizer):
    steps = 10
    method = get_method(MethodConfig(type="adalora", init_r=4, target_r=2, target=["q_proj", "v_proj"]))
    method.configure_schedule(steps)
    torch.manual_seed(0)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    ids = ids_batch(len(tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        method.on_optimizer_step(model, step)
        optimizer.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    kept = sum(int(torch.as_tensor(mask).sum()) for mask in pattern.values())
    assert kept == 2 * len(pattern) < 4 * len(pattern)  # the average rank reached target_r


# ------------------------------------------------------------------ AdapterDrop

@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "mam"])
def test_adapter_drop_counts_only_trained_parameters(tokenizer, name):
    """Adapters that AdapterDrop skips while training are frozen: not counted, not optimised.
    Dropped only at inference, they train, and count."""
    every_layer = fresh(name, tokenizer)[1]
    layer0 = sum(p.numel() for n, p in every_layer.named_parameters() if ".units.adapter.0." in n)
    assert layer0 > 0
    dropped = fresh(name, tokenizer, drop_layers=1)[1]
    assert count_parameters(dropped)[0] == count_parameters(every_layer)[0] - layer0
    assert not any(p.requires_grad for n, p in dropped.named_parameters() if ".units.adapter.0." in n)
    trained_anyway = fresh(name, tokenizer, drop_layers=1, drop_at="inference")[1]
    assert count_parameters(trained_anyway)[0] == count_parameters(every_layer)[0]


def test_adapter_drop_says_which_layers_it_drops(tokenizer):
    """The run's start lines name the dropped layers, when they are dropped, and the frozen count."""
    method, model = fresh("houlsby", tokenizer, drop_layers=1)
    layer0 = sum(p.numel() for n, p in model.named_parameters() if ".units.adapter.0." in n)
    assert method.notes(model) == [f"AdapterDrop: no adapters in layers 0-0 (1 of 2) in training and at inference; "
                                   f"their {layer0:,} parameters are frozen and not counted as trainable"]
    method, model = fresh("pfeiffer", tokenizer, drop_layers=1, drop_at="inference")
    assert method.notes(model) == ["AdapterDrop: no adapters in layers 0-0 (1 of 2) at inference only (they train)"]
    method, model = fresh("houlsby", tokenizer)
    assert method.notes(model) == []


def test_adapter_drop_line_is_in_the_run_log(tiny_model_dir, tmp_path):
    log = train_one_step(tiny_model_dir, tmp_path, {"type": "houlsby", "drop_layers": 1}).log.read_text()
    assert "AdapterDrop: no adapters in layers 0-0 (1 of 2) in training and at inference" in log


# ------------------------------------------------------------------ KTO

def test_kto_logs_the_unclamped_kl_estimate(tokenizer):
    """Policy != reference: the logged kl is the mean log-ratio on mismatched pairs (here
    negative, which the clamped reference point z0 would show as 0), and z0 still clamps."""
    cfg = build_config({"stage": "kto", "method": {"type": "lora", "r": 4}, "pref": {"beta": 0.3},
                        "train": {"loss_chunk_size": 3}})
    method = get_method(cfg.method)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    objective = build_objective(cfg, method, model, tokenizer)
    rows = [torch.randint(3, 400, (9,), generator=torch.Generator().manual_seed(s)).tolist() for s in (1, 2, 3)]
    items = [UnpairedExample(Example(r, [-100] * 4 + r[4:]), d) for r, d in zip(rows, (True, False, True))]
    batch = collate_unpaired(items, tokenizer.pad_token_id, False)
    _, metrics = objective.loss(model, batch)
    kl, z0 = objective.reference_point(model, batch)
    assert float(metrics["kl"]) == pytest.approx(float(kl) * len(items), abs=1e-5)
    assert float(kl) < -0.1 and float(z0) == 0.0  # logging z0, as before, would show 0.0


# ------------------------------------------------------------------ paged optimizers

def test_paged_optimizer_on_cpu_says_it_runs_unpaged():
    pytest.importorskip("bitsandbytes")
    lines: list[str] = []
    param = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = build_optimizer([{"params": [param]}], TrainConfig(optimizer="paged_adamw_8bit", lr=1e-3),
                                say=lines.append)
    assert not getattr(optimizer, "is_paged", False) and type(optimizer).__name__ == "AdamW8bit"
    assert any("paged_adamw_8bit" in line and "adamw_8bit instead" in line for line in lines)
    assert lines[-1] == "optimizer adamw_8bit, peak lr 0.001"
