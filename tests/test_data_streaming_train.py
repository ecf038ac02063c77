"""Training on ``data.streaming``: the batch loop reads micro-batches from the stream, the stream's
position goes into the checkpoint (JSON), and a run SIGKILLed after a checkpoint and resumed ends
with the weights of a run that was never interrupted. Settings a stream cannot honour are refused
before the model is loaded."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import build_config
from tunelab.data.pipeline import build_data
from tunelab.data.streaming import ExampleStream
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from tunelab.train.stream_batches import StreamBatches

runner = CliRunner()

#: Runs `tunelab ARGV[2:]`, killed right after the rename that publishes checkpoint ARGV[1] (then complete
#: on disk): an exact point, not a timed one.
LAUNCHER = '''
import os
import signal
import sys

name, rename = sys.argv[1], os.replace


def replace(src, dst, *args, **kwargs):
    rename(src, dst, *args, **kwargs)
    if os.path.basename(os.fspath(dst)) == name:
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
from tunelab.cli import app

app(sys.argv[2:], prog_name="tunelab")
'''

STEPS = 6


def write_jsonl(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "Answer, " * (i % 4 + 1)}) + "\n"
                            for i in range(count)))
    return path


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """A config writer for one tiny streaming LoRA job: windows of 5 records over 13, so the run
    crosses windows and an epoch (partial last micro-batch) before and after the kill."""
    root = tmp_path_factory.mktemp("stream")
    data = write_jsonl(root / "data.jsonl", 13)

    def write(out: Path, **train) -> Path:
        config = out.parent / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(tiny_model_dir)},
            "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            "data": {"train": [str(data)], "max_length": 48, "streaming": True, "shuffle_buffer": 5},
            "train": {"precision": "fp32", "lr": 1e-2, "batch_size": 2, "grad_accum": 2, "max_steps": STEPS,
                      "save_every": 2, "log_every": 1, **train},
            "output_dir": str(out)}))
        return config
    return write


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def tunelab(*args: str, kill_after: str = "") -> subprocess.CompletedProcess:
    """``tunelab ARGS`` in a child process on one thread (every run sums in the same order), SIGKILLed
    right after checkpoint ``kill_after`` is published when one is named."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", LAUNCHER, kill_after, *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_streaming_run_killed_after_a_checkpoint_resumes_at_the_same_example(job, tmp_path):
    full = tmp_path / "full"
    done = tunelab("train", str(job(full)), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (full / "train.log").read_text()
    assert "data: streamed train" in log and "truncated" not in log  # nothing is counted before the stream is read

    killed = tmp_path / "killed"
    config = job(killed)
    done = tunelab("train", str(config), "--quiet", kill_after="step-4")
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not (killed / "adapter").exists()
    position = json.loads((killed / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    # 4 steps of 2 micro-batches: the 7 of epoch 0 (13 examples: six of 2, the last of 1) and the first
    # of epoch 1, which is read in windows of 5: the next example is item 2 of its first window
    assert position["stream"]["epoch"] == 1 and position["stream"]["item"] == 2
    assert position["stream"]["window"] == 0 and position["epoch"] == 1

    done = tunelab("train", str(config), "--resume", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = adapter(full), adapter(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    losses = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                          if "loss" in r and r["step"] > 4]
    assert len(losses(full)) == 2 and losses(killed) == losses(full)


def stream_cfg(tmp_path: Path, count: int = 13, **data):
    data = {"train": [str(write_jsonl(tmp_path / "d.jsonl", count))], "template": "chatml", "streaming": True,
            "shuffle_buffer": 5, "cache_dir": str(tmp_path / "cache"), **data}
    return build_config({"stage": "sft", "data": data, "train": {"max_steps": 10}})


def read(batches: StreamBatches, count: int) -> list[tuple[int, int, list[list[int]]]]:
    """(epoch, index, the batch's input ids) of the next ``count`` micro-batches."""
    out = []
    for _, (epoch, index, numbers) in zip(range(count), batches.iterate(0, 0)):  # range first: read no more
        out.append((epoch, index, [batches.examples[n].input_ids for n in numbers]))
    return out


def test_stream_batches_are_consecutive_examples_and_resume_exactly(tmp_path, tokenizer):
    cfg = stream_cfg(tmp_path)
    epoch = list(ExampleStream(cfg, tokenizer))
    batches = StreamBatches(ExampleStream(cfg, tokenizer), batch_size=3, keep=2)
    seen, states = [], []
    for _, (number, index, numbers) in zip(range(7), batches.iterate(0, 0)):
        seen.append((number, index, [batches.examples[n].input_ids for n in numbers]))
        states.append(json.dumps(batches.state_dict()))
    # 13 examples in batches of 3: four full ones and a last one of 1, then the next epoch from index 0
    assert [(e, i, len(b)) for e, i, b in seen] == [(0, 0, 3), (0, 1, 3), (0, 2, 3), (0, 3, 3), (0, 4, 1),
                                                     (1, 0, 3), (1, 1, 3)]
    assert [ids for _, _, batch in seen[:5] for ids in batch] == [e.input_ids for e in epoch]
    assert batches.examples.lengths == {n: len(batches.examples[n].input_ids) for n in range(13, 19)}
    with pytest.raises(IndexError, match="only the examples of the last micro-batches"):
        batches.examples[12]  # noqa: B018  (two micro-batches back)
    for k in (0, 3, 4, 5):
        again = StreamBatches(ExampleStream(cfg, tokenizer), batch_size=3, keep=2)
        again.load_state_dict(json.loads(states[k]))
        assert [batch for _, _, batch in read(again, 6 - k)] == [batch for _, _, batch in seen[k + 1:]]


def test_a_stream_without_a_trainable_example_is_an_error_not_a_hang(tmp_path, tokenizer):
    cfg = stream_cfg(tmp_path, max_length=9)  # every answer cut away: every example dropped
    with pytest.raises(DataError, match="holds no trainable example"):
        read(StreamBatches(ExampleStream(cfg, tokenizer), batch_size=2, keep=1), 1)


@pytest.mark.parametrize("change, env, message", [
    ({"train": {"max_steps": None}}, {}, "data.streaming needs train.max_steps"),
    ({"stage": "dpo"}, {}, "data.streaming serves stages pt and sft, not 'dpo'"),
    ({}, {"WORLD_SIZE": "2"}, "this launch has 2 processes"),
])
def test_streaming_settings_are_refused_before_the_model_loads(tmp_path, monkeypatch, change, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    raw = {"model": {"name_or_path": str(tmp_path / "no-such-model")},
           "data": {"train": ["x.jsonl"], "streaming": True}, "train": {"max_steps": 2}, "output_dir": str(out)}
    raw = {**raw, **{k: ({**raw[k], **v} if isinstance(v, dict) else v) for k, v in change.items()}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()  # refused before anything was loaded or written


def test_checkpoint_keeps_the_stream_position_as_json_and_refuses_a_crafted_one(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    position = {"epoch": 1, "window": 2, "dataset": 0, "source": 0, "row": 40, "records": 40,
                "source_state": {"shard_idx": 0}, "item": 3, "offset": 0}
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(3, stream=position), keep_last=1)
    assert load_checkpoint(path, model, optimizer, scheduler).stream == position
    saved = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**saved, "stream": "position"}))
    with pytest.raises(TunelabError, match="trainer_state.json cannot be used.*'stream', an object or null"):
        load_checkpoint(path, model, optimizer, scheduler)
    del saved["stream"]  # a checkpoint of a tunelab before streaming runs: still loads
    (path / "trainer_state.json").write_text(json.dumps(saved))
    assert load_checkpoint(path, model, optimizer, scheduler) == TrainState(3)


def test_a_crafted_stream_position_is_refused_with_a_message(tmp_path, tokenizer):
    stream = ExampleStream(stream_cfg(tmp_path), tokenizer)
    with pytest.raises(ConfigError, match="not one this version of tunelab writes"):
        stream.load_state_dict({"epoch": -1})
    with pytest.raises(ConfigError, match="holds no stream position"):
        StreamBatches(stream, 2, 1).load_state_dict(None)


def test_trainer_lengths_come_from_the_cache_without_reading_examples(tmp_path, tokenizer, monkeypatch):
    from tunelab.data.columns import example_lengths
    from tunelab.data.views import ExampleView

    streamed = stream_cfg(tmp_path)
    cfg = streamed.model_copy(update={"data": streamed.data.model_copy(update={"streaming": False})})
    view = build_data(cfg, tokenizer).train
    expected = [len(e.input_ids) for e in view]
    monkeypatch.setattr(ExampleView, "__getitem__", lambda self, i: pytest.fail("an example was read"))
    monkeypatch.setattr(ExampleView, "__iter__", lambda self: pytest.fail("the examples were read"))
    assert list(example_lengths(view)) == expected
