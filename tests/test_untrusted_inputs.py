"""What a run directory, a model directory or the working directory cannot make tunelab do:
run model code the user did not allow on the command line, shadow an installed module with a
local file, or crash with a traceback on damaged weights."""

import json
import shutil
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import ModelConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.inference import load_run
from tunelab.models.loader import load_base, remote_code_allowed
from tunelab.serve.catalog import plan
from tunelab.train.rewards import load_reward_fn

runner = CliRunner()

# Model code shipped in a model directory (config.json auto_map): importing it creates MARKER.
MODEL_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM


class MarkerConfig(LlamaConfig):
    model_type = {model_type!r}


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
'''


def model_with_code(source, target, model_type="llama"):
    """A copy of the model dir ``source`` whose config.json maps the Auto classes to its own code.

    The directory name is unique per test: transformers imports the code once per name.
    """
    shutil.copytree(source, target)
    marker = target.with_suffix(".marker")
    (target / "marker_code.py").write_text(MODEL_CODE.format(marker=str(marker), model_type=model_type))
    config = json.loads((target / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "marker_code.MarkerConfig",
                                                   "AutoModelForCausalLM": "marker_code.MarkerForCausalLM"})
    (target / "config.json").write_text(json.dumps(config))
    return target, marker


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A finished one-step LoRA run on the plain tiny model."""
    root = tmp_path_factory.mktemp("trusted")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Q{i}?", "output": "A."}) + "\n" for i in range(4)))
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)}, "method": {"type": "lora", "r": 2, "alpha": 4},
        "data": {"train": [str(data)], "max_length": 32},
        "train": {"precision": "fp32", "max_steps": 1, "batch_size": 2}, "output_dir": str(root / "run")}))
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def hostile_run(trained_run, tiny_model_dir, tmp_path):
    """The run, copied, its config.yaml edited to a base with model code and trust_remote_code: true."""
    base, marker = model_with_code(tiny_model_dir, tmp_path / f"base-{tmp_path.name}")
    run = shutil.copytree(trained_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"].update(name_or_path=str(base), trust_remote_code=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, marker


# ------------------------------------------------------------------------------ trust_remote_code

def test_a_run_directory_cannot_turn_on_model_code(hostile_run):
    run, marker = hostile_run
    loaded = load_run(run, device=torch.device("cpu"))
    assert not marker.exists()
    assert loaded.cfg.model.trust_remote_code is False
    assert type(loaded.model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert plan([str(run)]).base.trust_remote_code is False  # what `serve` loads the base with
    with remote_code_allowed(True):  # the same load, allowed by the person running it: the code runs
        assert plan([str(run)]).base.trust_remote_code is True
        loaded = load_run(run, device=torch.device("cpu"))
    assert marker.exists()
    assert type(loaded.model.get_base_model()).__name__ == "MarkerForCausalLM"


def test_only_the_command_line_flag_allows_model_code(hostile_run):
    run, marker = hostile_run
    chat = ["chat", str(run), "--prompt", "hi", "--max-new-tokens", "1"]
    result = runner.invoke(app, chat)
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    result = runner.invoke(app, [*chat, "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert marker.exists()


def test_model_code_that_is_needed_but_not_allowed_gets_a_message(tiny_model_dir, tmp_path):
    base, marker = model_with_code(tiny_model_dir, tmp_path / f"custom-{tmp_path.name}", model_type="markerllama")
    with pytest.raises(TunelabError, match=rf"the model in {base} ships its own Python code .*--trust-remote-code"):
        load_base(ModelConfig(name_or_path=str(base)), torch.device("cpu"))
    assert not marker.exists()


# ------------------------------------------------------------------------------ damaged weights

@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_damaged_model_weights_name_the_file(tiny_model_dir, tmp_path, damage):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:len(data) // 2], "garbage header": b"\x10" + b"\0" * 7 + b"{x}" + data[11:],
                         "empty": b""}[damage])
    with pytest.raises(TunelabError, match=rf"the model weights cannot be read: {weights} \(.+\)\. The file is "
                                           r"truncated or corrupted .*Copy or download the model files again"):
        load_base(ModelConfig(name_or_path=str(model_dir)), torch.device("cpu"))


def test_damaged_weights_through_the_cli_are_one_message(trained_run, tiny_model_dir, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model_dir / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(model_dir)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["chat", str(run), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and str(model_dir / "model.safetensors") in result.output


# ------------------------------------------------------------------------------ reward functions

SHADOW = '''
from pathlib import Path
Path({marker!r}).write_text("imported")


def dumps(*args, **kwargs):
    return "local"
'''


@pytest.fixture
def shadowing_cwd(tmp_path, monkeypatch):
    """A working directory holding json.py, first on sys.path (as under `python -c` or a notebook),
    with the real json not yet imported: the situation where a local file used to win."""
    marker = tmp_path / "shadow.marker"
    (tmp_path / "json.py").write_text(SHADOW.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    monkeypatch.delitem(sys.modules, "json")
    return marker


def test_a_local_file_cannot_shadow_an_installed_module(shadowing_cwd):
    dumps = load_reward_fn("json:dumps")
    assert not shadowing_cwd.exists()
    assert dumps({"a": 1}) == '{"a": 1}'
    assert sys.path[0] == ""  # the import path is as it was


def test_a_file_path_loads_that_file_under_a_name_of_its_own(shadowing_cwd):
    dumps = load_reward_fn("./json.py:dumps")
    assert shadowing_cwd.exists() and dumps() == "local"
    assert "json" not in sys.modules or sys.modules["json"].__file__ != str(shadowing_cwd.parent / "json.py")


def test_reward_specs_that_cannot_load_say_how_to_fix_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def score(prompts, responses):\n    return [1.0] * len(prompts)\n")
    (tmp_path / "broken.py").write_text("def score(:\n")
    with pytest.raises(ConfigError, match=r"module 'my_rewards' cannot be imported .*installed packages only\. To "
                                          r"use the file .*my_rewards.py, name the file: "
                                          r"grpo.reward_fns=my_rewards.py:score\."):
        load_reward_fn("my_rewards:score", setting="grpo.reward_fns")
    assert load_reward_fn("my_rewards.py:score")(["p"], ["r"]) == [1.0]
    with pytest.raises(ConfigError, match=r"broken.py, line 1: .*Fix the syntax error"):
        load_reward_fn("broken.py:score")
    with pytest.raises(ConfigError, match=r"missing.py does not exist \(a relative path is read from the current "
                                          rf"directory, {tmp_path}\)"):
        load_reward_fn("sub/missing.py:score")
    with pytest.raises(ConfigError, match="my_rewards.py has no function 'nothing'"):
        load_reward_fn("my_rewards.py:nothing")
