"""Hub ids as base models (``model.name_or_path: org/name``), from a hub cache laid out by the test.

The cache has huggingface_hub's own layout (``models--org--name/{blobs,refs,snapshots}``,
snapshot files linking to blobs), and ``HF_HUB_OFFLINE=1`` is on, so nothing here touches
the network: socket connections fail for the in-process tests, and the subprocess points
``HF_ENDPOINT`` at a closed port.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import ModelConfig
from tunelab.data.records import Message
from tunelab.errors import ConfigError, TunelabError
from tunelab.inference import GenerationOptions, generate, load_run
from tunelab.models.loader import load_base
from tunelab.testing.tiny import save_tiny_model_dir

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
REPO = "tunelab-test/tiny-llama"
MAIN, V2 = "a" * 40, "b" * 40
IDS = torch.tensor([[1, 40, 41, 42, 43, 50, 60, 2]])
runner = CliRunner()


def lay_out_snapshot(cache: Path, repo: str, commit: str, ref: str, files: Path) -> Path:
    """What ``snapshot_download`` leaves behind: blobs by content hash, snapshot links, a ref file."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for file in files.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model_dir):
    """HF_HOME with REPO cached: ``main`` is the tiny model (seed 0), ``v2`` another one (seed 1)."""
    home = tmp_path_factory.mktemp("hf-home")
    lay_out_snapshot(home / "hub", REPO, MAIN, "main", tiny_model_dir)
    lay_out_snapshot(home / "hub", REPO, V2, "v2", save_tiny_model_dir(tmp_path_factory.mktemp("seed1"), seed=1))
    return home


@pytest.fixture
def offline_hub(hf_home, monkeypatch):
    """This process reads ``hf_home``'s cache, offline, and cannot open a network connection."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return hf_home


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_hub_id_loads_the_cached_snapshot_of_main_or_the_revision(offline_hub, tiny_model_dir):
    local, _ = load_base(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    main, _ = load_base(ModelConfig(name_or_path=REPO), torch.device("cpu"))
    v2, _ = load_base(ModelConfig(name_or_path=REPO, revision="v2"), torch.device("cpu"))
    by_commit, _ = load_base(ModelConfig(name_or_path=REPO, revision=V2), torch.device("cpu"))
    assert torch.equal(logits(main), logits(local))
    assert not torch.allclose(logits(v2), logits(main))
    assert torch.equal(logits(by_commit), logits(v2))


def test_offline_and_not_cached_is_one_message_naming_the_id_and_the_fix(offline_hub):
    with pytest.raises(TunelabError, match=r"model.name_or_path 'someone/missing' is not a local directory.*hub "
                                           r"repository 'someone/missing': it is not \(completely\) in the hub cache, "
                                           r"and HF_HUB_OFFLINE=1 forbids downloading it.*`hf download "
                                           r"someone/missing`.*HF_HOME / HF_HUB_CACHE"):
        load_base(ModelConfig(name_or_path="someone/missing"), torch.device("cpu"))
    with pytest.raises(TunelabError, match=r"hub repository 'tunelab-test/tiny-llama' \(revision 'v3'\)"):
        load_base(ModelConfig(name_or_path=REPO, revision="v3"), torch.device("cpu"))


def test_revision_of_a_local_model_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"model.revision 'v2' applies to hub ids .* Remove model.revision"):
        load_base(ModelConfig(name_or_path=str(tiny_model_dir), revision="v2"), torch.device("cpu"))


def test_damaged_weights_in_the_hub_cache_say_to_delete_that_models_folder(offline_hub, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    files = shutil.copytree(tiny_model_dir, tmp_path / "files")
    (files / "model.safetensors").write_bytes((files / "model.safetensors").read_bytes()[:500])
    lay_out_snapshot(tmp_path / "hub", "someone/broken", MAIN, "main", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TunelabError, match=rf"cannot be read: .*snapshots/{MAIN}/model.safetensors .*Delete "
                                           rf"{tmp_path / 'hub' / 'models--someone--broken'} \(that model's folder"):
        load_base(ModelConfig(name_or_path="someone/broken"), torch.device("cpu"))


@pytest.fixture
def hub_run(offline_hub, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": REPO},
        "method": {"type": "lora", "r": 4, "alpha": 8, "target": "all-linear"},
        "data": {"dataset_dir": str(FIXTURES), "train": ["identity"], "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 5e-3, "precision": "fp32"},
        "output_dir": str(tmp_path / "run")}))
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def test_a_hub_id_trains_chats_and_exports_offline(hub_run, tmp_path):
    saved = yaml.safe_load((hub_run / "config.yaml").read_text())
    assert saved["model"]["name_or_path"] == REPO  # the run names its base portably, not by a cache path
    loaded = load_run(hub_run, device=torch.device("cpu"))
    options = GenerationOptions(max_new_tokens=8, temperature=0, repetition_penalty=5.0)
    answer = generate(loaded, [[Message("user", "Who are you?")]], options)[0]
    chat = runner.invoke(app, ["chat", str(hub_run), "--prompt", "Who are you?", "--max-new-tokens", "8",
                               "--repetition-penalty", "5"])
    assert chat.exit_code == 0, chat.output
    assert chat.output.strip() == answer and answer

    merged = tmp_path / "merged"
    assert runner.invoke(app, ["export", str(hub_run), "--out", str(merged)]).exit_code == 0
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert (logits(plain) - logits(loaded.model)).abs().max() < 1e-4
    adapter = tmp_path / "adapter"
    assert runner.invoke(app, ["export", str(hub_run), "--out", str(adapter), "--adapter-only"]).exit_code == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO  # loads elsewhere with AutoPeftModelForCausalLM


def test_estimate_resolves_a_hub_id(offline_hub, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": REPO}, "method": {"type": "lora", "r": 4},
                                      "data": {"dataset_dir": str(FIXTURES), "train": ["identity"],
                                               "max_length": 64},
                                      "output_dir": str(tmp_path / "run")}))
    result = runner.invoke(app, ["estimate", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])


def test_a_fresh_process_finds_the_cache_through_hf_home_alone(hf_home):
    """Environment variables are read when huggingface_hub is imported: check them in a new process, where a
    hub request would hit a closed port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    code = f"from tunelab.models.hub import hub_snapshot; print(hub_snapshot({REPO!r}, 'v2'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == hf_home / "hub" / "models--tunelab-test--tiny-llama" / "snapshots" / V2
