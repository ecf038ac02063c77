"""Checkpoints that cannot run code: a pickled state.pt is refused unopened, the safetensors +
JSON format restores optimizer, scheduler and RNG exactly, crafted files fail with a message,
and a write that fails (full disk, read-only directory) leaves the previous checkpoint intact."""

import errno
import json
import os
import random
import struct

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.train.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint

runner = CliRunner()


# ------------------------------------------------------------------------------ helpers

def build(seed: int = 0, width: int = 8):
    """A small model with a frozen part, AdamW and a warmup-decay LambdaLR (what the loop builds)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.Dropout(0.5), nn.Linear(width, 1))
    model[0].bias.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3) / (1 + step))
    return model, optimizer, scheduler


def step(model, optimizer, scheduler):
    """One update whose result depends on every RNG: torch (data, dropout), Python and NumPy (noise)."""
    model.train()
    x = torch.randn(3, 4) + random.random() + float(np.random.rand())
    model(x).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_run(root, steps: int, save_every: int | None = 1):
    """A tiny LoRA run config + dataset for `tunelab train` (the tiny model dir is passed in)."""
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "Answer." * (i + 1)}) + "\n"
                            for i in range(6)))

    def config(model_dir):
        path = root / "run.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(model_dir)}, "method": {"type": "lora", "r": 4, "alpha": 8},
            "data": {"train": [str(data)], "max_length": 48},
            "train": {"precision": "fp32", "lr": 1e-2, "batch_size": 2, "max_steps": steps, "save_every": save_every,
                      "keep_last": 5},
            "output_dir": str(root / "run")}))
        return path
    return config


# ------------------------------------------------------------------------------ the old pickle format

class _Payload:
    """Unpickling this creates ``marker``: what a hostile state.pt would do (with worse code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_pickled_state_pt_and_never_unpickles_it(tiny_model_dir, tmp_path):
    config = write_run(tmp_path, steps=2)(tiny_model_dir)
    first = runner.invoke(app, ["train", str(config), "--quiet"])
    assert first.exit_code == 0, first.output
    latest = list_checkpoints(tmp_path / "run")[-1]
    for name in (ckpt.STATE_FILE, ckpt.STATE_TENSORS_FILE):  # the layout an older tunelab wrote
        (latest / name).unlink()
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker), "scheduler": {}, "rng": {}}, latest / "state.pt")

    result = runner.invoke(app, ["train", str(config), "--resume", "--quiet"])

    assert result.exit_code != 0
    assert not marker.exists(), "the pickle was loaded"
    message = " ".join(result.output.split())
    assert str(latest) in message and "state.pt" in message and "pickle" in message
    assert "--overwrite" in message and "Traceback" not in result.output
    # The payload is live: loading it the old way runs it (so the assertion above can fail).
    torch.load(latest / "state.pt", weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------ round trip

def test_resumed_training_equals_uninterrupted_with_every_rng(tmp_path):
    """2 steps, save, 2 more == 2 steps, load into a fresh build, 2 more: same weights, lr, RNG draws."""
    model, optimizer, scheduler = build()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    for _ in range(2):
        step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(2, 1, 3, 40), keep_last=2)
    for _ in range(2):
        step(model, optimizer, scheduler)
    draws = (torch.rand(2), random.random(), np.random.rand())

    other, other_opt, other_sched = build()  # the same base; then other trained weights, state and RNGs
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    step(other, other_opt, other_sched)
    assert load_checkpoint(path, other, other_opt, other_sched) == TrainState(2, 1, 3, 40)
    for _ in range(2):
        step(other, other_opt, other_sched)

    for key, value in weights(model).items():
        assert torch.equal(value, weights(other)[key]), key
    assert other_sched.get_last_lr() == scheduler.get_last_lr()
    assert other_opt.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert torch.equal(torch.rand(2), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]


def test_state_files_are_safetensors_and_json_only(tmp_path):
    model, optimizer, scheduler = build()
    step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(1), keep_last=2)
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "state.safetensors", "trainable.safetensors",
                                                      "trainer_state.json"]
    tensors = load_file(str(path / "state.safetensors"))
    assert tensors["rng.torch"].dtype == torch.uint8
    assert torch.equal(tensors["optimizer.state[0].exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    tree = json.loads((path / "state.json").read_text())
    assert tree["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.8, 0.95]}
    assert tree["scheduler"]["last_epoch"] == 1
    assert sorted(load_file(str(path / "trainable.safetensors"))) == ["0.weight", "2.bias", "2.weight"]


def test_eight_bit_optimizer_state_round_trips(tmp_path):
    """bitsandbytes shares one quantization map between parameters; safetensors refuses shared tensors."""
    bnb = pytest.importorskip("bitsandbytes")
    results = []
    for resume in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 4096)
        optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        torch.manual_seed(1), random.seed(1), np.random.seed(1)
        for i in range(4):
            if resume and i == 2:
                path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(2), keep_last=1)
                model = nn.Linear(4, 4096)
                optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
                load_checkpoint(path, model, optimizer, scheduler)
            step(model, optimizer, scheduler)
        results.append(model.weight.detach().clone())
    assert torch.equal(results[0], results[1])


# ------------------------------------------------------------------------------ crafted files

def _header(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


CRAFTED = {
    "header length of 2^64-1": b"\xff" * 8 + b"{}",
    "header longer than the file": struct.pack("<Q", 10_000) + b"{}",
    "header that is not JSON": struct.pack("<Q", 12) + b"{not json!!}",
    "offsets past the end": _header({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
    "petabyte tensor": _header({"x": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}}),
    "unknown dtype": _header({"x": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}) + b"\0",
    "empty file": b"",
}


@pytest.mark.parametrize("victim", [ckpt.TRAINABLE_FILE, ckpt.STATE_TENSORS_FILE])
@pytest.mark.parametrize("crafted", CRAFTED.values(), ids=CRAFTED.keys())
def test_a_crafted_safetensors_file_fails_with_a_message_and_changes_nothing(tmp_path, victim, crafted):
    model, optimizer, scheduler = build()
    step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(1), keep_last=2)
    (path / victim).write_bytes(crafted)
    fresh, fresh_opt, fresh_sched = build(seed=3)
    before = weights(fresh)
    with pytest.raises(TunelabError, match=rf"{victim} cannot be used: .*damaged.*Delete {path}"):
        load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert all(torch.equal(v, weights(fresh)[k]) for k, v in before.items())
    assert fresh_opt.state_dict()["state"] == {}


@pytest.mark.parametrize("content, problem", [
    ("{", "Expecting property name"),
    ("[" * 100_000 + "]" * 100_000, "recursion|damaged"),
    (json.dumps({"format": "tunelab-checkpoint/9"}), "format is 'tunelab-checkpoint/9'"),
    (json.dumps({"format": ckpt.FORMAT, "optimizer": {"__tensor__": "elsewhere"}, "scheduler": {}, "rng": {}}),
     "tensor 'elsewhere'"),
    (json.dumps({"format": ckpt.FORMAT, "optimizer": {"__items__": [[[1], 2]]}, "scheduler": {}, "rng": {}}),
     "unhashable"),
    (json.dumps({"format": ckpt.FORMAT, "optimizer": {}}), "no 'scheduler'"),
])
def test_a_crafted_state_json_fails_with_a_message(tmp_path, content, problem):
    model, optimizer, scheduler = build()
    step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(1), keep_last=2)
    (path / "state.json").write_text(content)
    with pytest.raises(TunelabError, match=rf"state.json cannot be used: .*({problem})"):
        load_checkpoint(path, *build())


def test_a_checkpoint_of_another_shape_is_refused_before_anything_changes(tmp_path):
    """What `--resume` after changing LoRA r meets: parameters of the same names, other shapes."""
    model, optimizer, scheduler = build(width=8)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(0), keep_last=2)
    with pytest.raises(TunelabError, match=r"does not fit this run's model: 2 parameter\(s\) of another shape, "
                                           r"saved vs now \(e.g. 0.weight \(8, 4\) vs \(16, 4\), 2.weight "
                                           r"\(1, 8\) vs \(1, 16\)\). Resume with the same method and model config"):
        load_checkpoint(path, *build(width=16))


# ------------------------------------------------------------------------------ failed writes

def _failing_write(code: int):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # half a file, then the disk refuses more
            handle.write(b"\0" * 64)
        raise OSError(code, os.strerror(code), filename)
    return save_file


@pytest.mark.parametrize("code, reason", [
    (errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "the disk quota is exceeded"),
    (errno.EACCES, "the directory is not writable"), (errno.EROFS, "the file system is read-only")])
def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, code, reason):
    model, optimizer, scheduler = build()
    step(model, optimizer, scheduler)
    previous = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(1), keep_last=1)
    step(model, optimizer, scheduler)
    monkeypatch.setattr(ckpt, "save_file", _failing_write(code))
    with pytest.raises(TunelabError, match=rf"could not write checkpoint .*step-2: {reason} .*previous checkpoint "
                                           rf"{previous} is intact.*--resume"):
        save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(2), keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]  # no temporary directory
    assert load_checkpoint(previous, *build()) == TrainState(1)


def test_a_full_disk_during_training_stops_with_one_message(tiny_model_dir, tmp_path, monkeypatch):
    config = write_run(tmp_path, steps=3)(tiny_model_dir)
    real = ckpt.save_file
    calls = []

    def fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 2:  # the second checkpoint's first file
            return _failing_write(errno.ENOSPC)(tensors, filename)
        return real(tensors, filename, metadata)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert "the disk is full" in result.output
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-1"]
