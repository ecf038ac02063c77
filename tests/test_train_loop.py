"""The training loop end to end on a tiny model: accumulation, resume, save/load, export."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import build_config
from tunelab.data.records import Message
from tunelab.inference import GenerationOptions, generate, load_run
from tunelab.runs import RunDir
from tunelab.train.loop import Trainer, train
from tunelab.train.monitor import Monitor

QUESTIONS = ["Who are you?", "What is your name?", "Tell me about yourself.", "Who made you?",
             "Are you a person?", "What can you do?", "Introduce yourself please.", "What should I call you?"]


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "identity.jsonl"
    rows = [{"instruction": q, "input": "", "output": "I am Tuna, an assistant trained with tunelab." + " ok" * i}
            for i, q in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(tiny_model_dir, identity_file, out, *overrides):
    base = {"model": {"name_or_path": str(tiny_model_dir)}, "method": {"type": "lora", "r": 4, "alpha": 8},
            "data": {"train": [str(identity_file)], "max_length": 64},
            "train": {"precision": "fp32", "lr": 1e-2, "batch_size": 4, "max_steps": 2, "log_every": 1},
            "output_dir": str(out)}
    return build_config(base, list(overrides))


def trained_weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_accumulation_equals_large_batch(tiny_model_dir, identity_file, tmp_path):
    """4 examples as one micro-batch == 2 micro-batches of 2 (token-level normalisation, SGD so scale matters)."""
    common = ["train.optimizer=sgd", "train.max_steps=1", "data.max_samples=4", "data.group_by_length=false",
              "train.max_grad_norm=null", "train.lr=0.5"]
    large = train(make_cfg(tiny_model_dir, identity_file, tmp_path / "large", *common, "train.batch_size=4"),
                  progress=False)
    small = train(make_cfg(tiny_model_dir, identity_file, tmp_path / "small", *common, "train.batch_size=2",
                           "train.grad_accum=2"), progress=False)
    assert large.final_loss == pytest.approx(small.final_loss, abs=1e-6)
    a, b = trained_weights(tmp_path / "large"), trained_weights(tmp_path / "small")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 0, "the step must change the adapter"


def test_resumed_run_matches_uninterrupted(tiny_model_dir, identity_file, tmp_path, monkeypatch):
    opts = ["train.max_steps=4", "train.save_every=2", "train.keep_last=5", "method.dropout=0.1"]
    full = train(make_cfg(tiny_model_dir, identity_file, tmp_path / "full", *opts), progress=False)

    advance = Monitor.advance
    calls = {"n": 0}

    def interrupt_after_two(self, steps=1):
        advance(self, steps)
        calls["n"] += 1
        if calls["n"] == 3:  # the loop is interrupted during step 3: it checkpoints step 3 and stops
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "advance", interrupt_after_two)
    first = train(make_cfg(tiny_model_dir, identity_file, tmp_path / "cut", *opts), progress=False)
    assert first.interrupted and first.steps == 3
    assert not (tmp_path / "cut" / "adapter").exists()
    stopped = RunDir(tmp_path / "cut").read_status()
    assert (stopped.status, stopped.step, stopped.total_steps) == ("stopped", 3, 4)
    assert "stopped at step 3: checkpoint saved" in RunDir(tmp_path / "cut").read_log()
    monkeypatch.setattr(Monitor, "advance", advance)
    resumed = train(make_cfg(tiny_model_dir, identity_file, tmp_path / "cut", *opts), resume=True, progress=False)
    assert resumed.steps == 4
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)
    a, b = trained_weights(tmp_path / "full"), trained_weights(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    steps = [row["step"] for row in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())
             if "loss" in row]
    assert steps == [1, 2, 3, 4]
    assert RunDir(tmp_path / "cut").read_status().status == "finished"


def test_run_directory_is_complete_and_reloads(tiny_model_dir, identity_file, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_model_dir, identity_file, tmp_path / "run", "train.max_steps=3", "train.save_every=1",
                   "train.keep_last=2", "data.eval_split=2")
    writes = []
    real_write = RunDir.write_config
    monkeypatch.setattr(RunDir, "write_config", lambda self, c: (writes.append(self.root), real_write(self, c)))
    result = train(cfg, progress=False)
    assert writes == [tmp_path / "run"]  # config.yaml is written once per run
    log = RunDir(tmp_path / "run").read_log()
    assert log.splitlines()[0].startswith(("method lora: ", "optimizer ")) and "method lora: " in log
    assert "step 3/3 loss=" in log
    run = tmp_path / "run"
    for name in ("config.yaml", "adapter/adapter_config.json", "metrics.jsonl", "loss.png", "tokenizer.json"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= rows[0].keys()
    assert any("eval_loss" in row for row in rows)
    assert result.eval_loss is not None and result.steps == 3

    loaded = load_run(run, device=torch.device("cpu"))
    answers = generate(loaded, [[Message("user", "Who are you?")]], GenerationOptions(max_new_tokens=5,
                                                                                      temperature=0))
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_refuses_to_overwrite_a_finished_run(tiny_model_dir, identity_file, tmp_path):
    cfg = make_cfg(tiny_model_dir, identity_file, tmp_path / "run", "train.max_steps=1")
    train(cfg, progress=False)
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="already holds a run.*--resume.*--overwrite"):
        Trainer(cfg, progress=False)


def test_loss_falls_when_training_longer(tiny_model_dir, identity_file, tmp_path):
    # Full fine-tuning: the tiny random model's tied embeddings and norms cap what LoRA can fit.
    result = train(make_cfg(tiny_model_dir, identity_file, tmp_path / "run", "train.max_steps=12",
                            "train.lr=1e-2", "method.type=full"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.tokens_per_s > 0


def _oom_above_two_rows(monkeypatch):
    from tunelab.train.objectives import CausalLMObjective

    real = CausalLMObjective.loss

    def loss(self, model, batch):
        if batch["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, model, batch)

    monkeypatch.setattr(CausalLMObjective, "loss", loss)


def test_auto_batch_size_recovers_from_out_of_memory(tiny_model_dir, identity_file, tmp_path, monkeypatch):
    common = ["train.optimizer=sgd", "train.max_steps=2", "data.packing=false", "train.batch_size=4",
              "data.group_by_length=false"]
    reference = train(make_cfg(tiny_model_dir, identity_file, tmp_path / "ref", *common), progress=False)
    _oom_above_two_rows(monkeypatch)
    recovered = train(make_cfg(tiny_model_dir, identity_file, tmp_path / "auto", *common,
                               "train.auto_batch_size=true"), progress=False)
    assert recovered.steps == 2
    assert recovered.final_loss == pytest.approx(reference.final_loss, abs=1e-6)
    a, b = trained_weights(tmp_path / "ref"), trained_weights(tmp_path / "auto")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_out_of_memory_without_auto_batch_size_explains_the_fix(tiny_model_dir, identity_file, tmp_path,
                                                                 monkeypatch):
    from tunelab.errors import TunelabError

    _oom_above_two_rows(monkeypatch)
    with pytest.raises(TunelabError, match="out of memory at step 1.*train.auto_batch_size=true"):
        train(make_cfg(tiny_model_dir, identity_file, tmp_path / "run", "data.packing=false"), progress=False)
    failed = RunDir(tmp_path / "run").read_status()
    assert failed.status == "failed" and failed.error.startswith("out of memory at step 1")
    assert "failed: out of memory at step 1" in RunDir(tmp_path / "run").read_log()
