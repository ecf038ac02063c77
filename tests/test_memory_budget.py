"""train.memory_budget: sizes, the settings it picks, its refusal, its report; model.rope_scaling."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from tunelab.config import ModelConfig, build_config
from tunelab.errors import ConfigError
from tunelab.models.loader import load_base
from tunelab.config import parse_size
from tunelab.estimate import estimate, parse_target
from tunelab.estimate.budget import ESTIMATE_MARGIN, MemorySettings, fit_memory_budget, relative_step_time

RECORDS = [{"instruction": f"Say the number {i} in words, please.", "input": "",
            "output": "The quick brown fox jumps over the lazy dog. " * (2 + i % 3)} for i in range(8)]


@pytest.fixture
def run_tree(tmp_path, tiny_model_dir):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    return {"model": {"name_or_path": str(tiny_model_dir)}, "method": {"type": "lora", "r": 4},
            "data": {"train": [str(data)], "max_length": 128},
            "train": {"batch_size": 4, "max_steps": 2, "precision": "fp32"}, "output_dir": str(tmp_path / "run")}


def config(tree, *overrides):
    return build_config(copy.deepcopy(tree), list(overrides))


def fit(tree, budget):
    return fit_memory_budget(config(tree, f"train.memory_budget={budget}"), framework=0)


def just_below(predicted: int) -> int:
    """The largest budget in which a setting predicted at ``predicted`` bytes does not fit."""
    return int(predicted / (1 - ESTIMATE_MARGIN)) - 1


def test_sizes_parse_in_si_and_iec_units():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 GiB") == 1.5 * 2**30
    assert parse_size("512mib") == 512 * 2**20
    assert parse_size("1000") == 1000
    assert config({}, "train.memory_budget=AUTO").train.memory_budget == "auto"


@pytest.mark.parametrize("text", ["lots", "2 GBs", "-1GB", "0GB"])
def test_a_bad_budget_names_the_field(text):
    with pytest.raises(ConfigError, match=r"train\.memory_budget.*is not a memory size|train\.memory_budget.*positive"):
        config({}, f"train.memory_budget={text}")


def test_a_generous_budget_keeps_the_fastest_settings(run_tree):
    resolved, choice = fit(run_tree, "20GiB")
    assert choice.settings == MemorySettings(False, 256, 1)
    assert (resolved.train.batch_size, resolved.train.grad_accum) == (4, 1)
    assert choice.predicted_peak_bytes <= choice.budget_bytes
    assert choice.next_faster is None and len(choice.lines()) == 1  # nothing faster was turned down


def test_a_lower_budget_picks_a_lighter_setting_that_fits(run_tree):
    _, roomy = fit(run_tree, "20GiB")
    tight_budget = just_below(roomy.predicted_peak_bytes)
    resolved, tight = fit(run_tree, str(tight_budget))
    assert tight.settings != roomy.settings
    # the margin for the estimate's error is kept free
    assert tight.predicted_peak_bytes <= tight_budget * (1 - ESTIMATE_MARGIN) < roomy.predicted_peak_bytes
    # the resolved config is what the run trains with: the same global batch
    assert resolved.train.batch_size * resolved.train.grad_accum == 4
    assert resolved.train.gradient_checkpointing == tight.settings.gradient_checkpointing
    assert resolved.train.loss_chunk_size == tight.settings.loss_chunk_size
    # the log says why nothing faster was taken: the setting ranked just above, over the allowance
    faster, faster_peak = tight.next_faster
    facts = estimate(config(run_tree), parse_target("cpu"), framework=0).facts
    share = facts.trainable_params / facts.total_params
    assert relative_step_time(faster, share) <= relative_step_time(tight.settings, share)
    assert faster_peak > tight_budget * (1 - ESTIMATE_MARGIN)
    assert f"the next faster setting ({faster.describe(4, 1)}) is predicted at {faster_peak / 2**30:.2f} GiB" \
        in tight.lines()[1]


def test_the_ranking_follows_what_was_measured():
    """benchmarks/memory_budget.py: on the compact heap, LoRA split into micro-batches of 1 ran faster
    than checkpointed, full fine-tuning slower; loss chunks of 16 rows cost more than a 2-way split."""
    checkpointed, split4 = MemorySettings(True, 256, 1), MemorySettings(False, 16, 4)
    lora_share, full_share = 0.018, 1.0
    assert relative_step_time(split4, lora_share) < relative_step_time(checkpointed, lora_share)
    assert relative_step_time(checkpointed, full_share) < relative_step_time(split4, full_share)
    assert relative_step_time(MemorySettings(False, 256, 2), lora_share) \
        < relative_step_time(MemorySettings(False, 16, 1), lora_share)
    assert relative_step_time(MemorySettings(False, 256, 1), full_share) == 1.0


def test_an_impossible_budget_is_refused_before_the_model_loads(run_tree, monkeypatch, tmp_path):
    from tunelab.cli import app

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("tunelab.train.lifecycle.load_base", no_loading)
    monkeypatch.setattr("tunelab.models.loader.load_base", no_loading)
    monkeypatch.setattr("tunelab.estimate.core.framework_bytes", lambda: 0)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(config(run_tree, "train.memory_budget=1MB").model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(config_file), "--quiet"])
    assert result.exit_code == 2, result.output
    assert re.search(r"memory_budget 1MB .*cannot be met.*predicted to peak at \d+\.\d\d GiB"
                     r".*Raise train\.memory_budget to at least", " ".join(result.output.split()))
    assert not (tmp_path / "run").exists()  # nothing written either


def test_prefix_tuning_is_never_given_checkpointing(run_tree):
    tree = {**run_tree, "method": {"type": "prefix", "num_virtual_tokens": 4}}
    _, roomy = fit(tree, "20GiB")
    _, tight = fit(tree, str(just_below(roomy.predicted_peak_bytes)))
    assert not tight.settings.gradient_checkpointing and tight.settings != roomy.settings


def test_the_run_logs_its_choice_and_predicted_against_measured_peak(run_tree, monkeypatch):
    from tunelab.train.loop import Trainer

    monkeypatch.setattr("tunelab.estimate.core.framework_bytes", lambda: 0)
    heaps: list[bool] = []  # the real one would change malloc settings for the rest of this test process
    monkeypatch.setattr("tunelab.train.lifecycle.compact_heap", lambda: heaps.append(True) or True)
    resolved, choice = fit_memory_budget(config(run_tree, "train.memory_budget=20GiB"))
    trainer = Trainer(resolved, progress=False, budget=choice)
    result = trainer.run()
    log = (result.run_dir / "train.log").read_text(encoding="utf-8")
    assert "memory budget 20GiB = 20.00 GiB: gradient checkpointing off" in log
    assert heaps == [True] and "compact heap: freed blocks of 1 MiB or more go back to the system" in log
    assert f"predicted {result.budget.predicted_peak_bytes / 2**30:.2f} GiB" in log
    assert "within the budget of 20.00 GiB" in log


def test_rope_scaling_reaches_the_model_config(tiny_model_dir):
    plain, _ = load_base(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    scaled, _ = load_base(ModelConfig(name_or_path=str(tiny_model_dir), rope_scaling={"type": "linear", "factor": 4}),
                          torch.device("cpu"))
    assert scaled.config.rope_parameters["rope_type"] == "linear"
    assert scaled.config.max_position_embeddings == 4 * plain.config.max_position_embeddings
    # linear scaling divides every rotary frequency by the factor
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq * 4, plain.model.rotary_emb.inv_freq)


def test_a_budget_is_never_silently_ignored(run_tree):
    from tunelab.train.loop import Trainer

    with pytest.raises(ConfigError, match="fit_memory_budget"):
        Trainer(config(run_tree, "train.memory_budget=2GB"), progress=False)
