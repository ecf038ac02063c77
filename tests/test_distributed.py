"""Data parallelism on CPU: 2 processes under torchrun (gloo), tiny Llama, fp32.

What could break and is checked here: the rank sharding of micro-batches (2 processes with
grad_accum 1 must end at the weights of 1 process with grad_accum 2, for DDP and FSDP2, LoRA
and full), FSDP2 checkpoints (a run killed after a checkpoint and resumed ends equal to the
uninterrupted run), `tunelab train --nproc-per-node`, every stage under DDP, and the settings
refused before anything loads. Launches are few and each trains several runs, because starting
a process costs more than these runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import build_config, load_config
from tunelab.errors import ConfigError
from tunelab.estimate import estimate_main
from tunelab.runs import RunDir
from tunelab.train import run_stage
from tunelab.train.distributed import check_distributed, check_world_for_data
from tunelab.train.launch import strip_launcher_flag

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
LAUNCH_TIMEOUT = 900  # a safety net against a hang, never an assertion on speed
STEPS, SAVE_EVERY = 4, 2

#: Trains each config given, in one process group; ``--die-after-checkpoint STEP RANK`` SIGKILLs
#: rank RANK right after the collective checkpoint of step STEP (a crash of one rank).
WORKER = '''
import os, signal, sys
from tunelab.config import load_config
from tunelab.train import lifecycle, run_stage

args = sys.argv[1:]
if args[0] == "--die-after-checkpoint":
    step, rank, args = int(args[1]), int(args[2]), args[3:]
    checkpoint = lifecycle.RunTrainer._checkpoint

    def checkpoint_then_die(self):
        checkpoint(self)
        if self.state.step == step and self.rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    lifecycle.RunTrainer._checkpoint = checkpoint_then_die
for path in args:
    run_stage(load_config(path, []), progress=False)
'''


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """2 processes on this machine; ``--standalone`` takes a free port for each launch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The final saved weights of a run (the adapter, or the whole model)."""
    files = sorted(run.glob("adapter/*.safetensors")) + sorted(run.glob("model/*.safetensors"))
    assert files, f"no weights saved in {run}"
    return {name: tensor for file in files for name, tensor in load_file(str(file)).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """Writes the config of one tiny job: method, launch strategy, grad_accum and output dir vary."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "Answer, " * (i % 5 + 1)}) + "\n"
                            for i in range(12)))

    def write(name: str, method: str, grad_accum: int, distributed: str = "auto") -> Path:
        tree = {"model": {"name_or_path": str(tiny_model_dir)},
                "method": {"type": method, **({"r": 4, "alpha": 8} if method == "lora" else {})},
                "data": {"train": [str(data)], "max_length": 48},
                "train": {"precision": "fp32", "lr": 1e-2, "batch_size": 2, "grad_accum": grad_accum,
                          "max_steps": STEPS, "save_every": SAVE_EVERY, "distributed": distributed},
                "output_dir": str(root / name)}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path
    return write


@pytest.fixture(scope="module")
def one_process(job):
    """The references: 1 process with grad_accum 2, in this process, one thread like the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for method in ("lora", "full"):
            cfg = load_config(job(f"one-{method}", method, grad_accum=2), [])
            runs[method] = run_stage(cfg, progress=False).run_dir
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.fixture(scope="module")
def two_processes(job):
    """2 processes with grad_accum 1: DDP and FSDP2, LoRA and full, in one launch."""
    configs = {(strategy, method): job(f"two-{strategy}-{method}", method, 1, strategy)
               for strategy in ("ddp", "fsdp") for method in ("lora", "full")}
    worker = configs["ddp", "lora"].parent / "worker.py"
    worker.write_text(WORKER)
    done = torchrun(worker, *configs.values(), cwd=worker.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return {key: Path(yaml.safe_load(path.read_text())["output_dir"]) for key, path in configs.items()}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_what_one_process_with_twice_the_accumulation_does(strategy, method, one_process,
                                                                               two_processes):
    two, one = two_processes[strategy, method], one_process[method]
    assert max_diff(weights(two), weights(one)) <= 1e-5
    trained = weights(RunDir(one).root)
    assert max(float(t.abs().max()) for t in trained.values()) > 0  # something was trained
    rows = RunDir(two).read_metrics()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rank 0 alone logs: one row per step
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in RunDir(one).read_metrics()], abs=1e-5)


def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_same_weights(job, two_processes):
    """Rank 0 is SIGKILLed right after the step-2 checkpoint; the other rank must not hang; then
    `tunelab train --resume --nproc-per-node 2` finishes the run as if nothing happened."""
    config = job("killed", "lora", 1, "fsdp")
    run = RunDir(yaml.safe_load(config.read_text())["output_dir"])
    crashed = torchrun(config.parent / "worker.py", "--die-after-checkpoint", SAVE_EVERY, 0, config, cwd=config.parent)
    assert crashed.returncode != 0  # the launch ended (no rank waits forever) and reports the failure
    assert [p.name for p in run.list_checkpoints()] == ["step-2"] and not (run.root / "adapter").exists()
    resumed = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(config), "--resume", "--quiet",
                              "--nproc-per-node", "2"], cwd=config.parent, env=_env(), capture_output=True,
                             text=True, timeout=LAUNCH_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.count("done: 4 steps") == 1  # one summary (rank 0)
    assert max_diff(weights(run.root), weights(two_processes["fsdp", "lora"])) == 0.0
    assert run.read_status().status == "finished"


def test_sigterm_to_one_rank_stops_every_rank_after_a_checkpoint(job):
    """SIGTERM to rank 0 alone (the pid status.json names): the ranks agree to stop at the same step,
    checkpoint it together, and `--nproc-per-node` exits 3 like a single process."""
    config = job("signalled", "lora", 1)
    tree = yaml.safe_load(config.read_text())
    tree["train"].update(max_steps=10**6, save_every=None)  # ends only by the signal, checkpoints only then
    config.write_text(yaml.safe_dump(tree))
    run = RunDir(tree["output_dir"])
    launch = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(config), "--quiet",
                               "--nproc-per-node", "2"], cwd=config.parent, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        status = run.read_status()
        while launch.poll() is None and not (status and status.status == "running" and status.step >= 1):
            status = run.read_status()
            time.sleep(0.2)  # polling the file until training runs; nothing depends on how long it takes
        os.kill(status.pid, signal.SIGTERM)
        out, err = launch.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        launch.kill()
    assert launch.returncode == 3, err[-4000:]
    status = run.read_status()
    assert status.status == "stopped" and [p.name for p in run.list_checkpoints()] == [f"step-{status.step}"]
    assert "stopped (resume with --resume)" in out


# ----------------------------------------------------------------------------- every stage under DDP

STAGE_DATA = {"pt": "c4_demo", "sft": "identity", "rm": "dpo_en_demo", "dpo": "dpo_en_demo", "kto": "kto_en_demo",
              "ppo": "identity", "grpo": "identity"}
#: Methods of each family, trained by sft under DDP (lora is in every stage run).
DDP_METHODS = {"freeze": {}, "dora": {"r": 2}, "adalora": {"init_r": 4, "target_r": 2}, "ia3": {},
               "prefix": {"num_virtual_tokens": 2}, "houlsby": {}}
REWARDS = ("def bangs(prompts, completions, **kwargs):\n"
           "    return [float(str(c).count('!')) + 0.1 * len(str(c)) for c in completions]\n")


def test_every_stage_and_method_family_trains_under_ddp(tiny_model_dir, tmp_path):
    (tmp_path / "ddp_rewards.py").write_text(REWARDS)
    runs = {}
    for name, method in [*((stage, {"type": "lora", "r": 2}) for stage in STAGE_DATA),
                         *(("sft", {"type": m, **size}) for m, size in DDP_METHODS.items())]:
        tree = {"model": {"name_or_path": str(tiny_model_dir)}, "stage": name, "method": method,
                "data": {"dataset_dir": str(FIXTURES), "train": [STAGE_DATA[name]], "max_length": 48},
                "train": {"precision": "fp32", "batch_size": 1, "max_steps": 2},
                "ppo": {"reward_fn": "ddp_rewards.py:bangs", "rollout_batch_size": 1, "mini_batch_size": 1,
                        "max_new_tokens": 4},
                "grpo": {"reward_fns": ["ddp_rewards.py:bangs"], "prompts_per_step": 1, "num_generations": 2,
                         "max_new_tokens": 4},
                "output_dir": str(tmp_path / f"{name}-{method['type']}")}
        tree = {k: v for k, v in tree.items() if k not in ("ppo", "grpo") or k == name}
        path = tmp_path / f"{name}-{method['type']}.yaml"
        path.write_text(yaml.safe_dump(tree))
        runs[path] = RunDir(tree["output_dir"])
    (tmp_path / "worker.py").write_text(WORKER)
    done = torchrun(tmp_path / "worker.py", *runs, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    for path, run in runs.items():
        status = run.read_status()
        assert (status.status, status.step) == ("finished", 2), path.name
        assert [r["step"] for r in run.read_metrics() if "loss" in r] == [1, 2], path.name


# ----------------------------------------------------------------------------- refused before loading

def _cfg(**tree) -> object:
    return build_config({"model": {"name_or_path": "unused"}, **tree})


@pytest.mark.parametrize(("tree", "message"), [
    ({"train": {"distributed": "deepspeed", "deepspeed": "ZERO2"}}, "deepspeed needs a GPU"),
    ({"train": {"distributed": "deepspeed", "deepspeed": "ZERO3"}}, "ZeRO stage 3"),
    ({"train": {"distributed": "deepspeed", "deepspeed": "ZERO2", "save_every": 5}}, "save_every does not work"),
    ({"train": {"distributed": "deepspeed", "deepspeed": "ZERO2", "grad_accum": 2}}, "grad_accum=2 with train"),
    ({"train": {"distributed": "deepspeed"}}, "needs train.deepspeed"),
    ({"train": {"distributed": "deepspeed", "deepspeed": "missing.json"}}, "missing.json cannot be read"),
    ({"train": {"distributed": "fsdp"}, "method": {"type": "prefix"}}, "cannot train method 'prefix'"),
    ({"train": {"distributed": "fsdp"}, "method": {"type": "qlora"}}, "cannot train method 'qlora': its base "
                                                                        "weights are bitsandbytes 4-bit"),
    ({"train": {"distributed": "fsdp"}, "model": {"name_or_path": "unused", "quantization": "8bit"}},
     "cannot shard a quantized base"),
    ({"train": {"distributed": "fsdp"}, "stage": "ppo", "ppo": {"reward_fn": "m:f"}}, "cannot run stage ppo"),
    ({"train": {"deepspeed": "ds.json"}}, "only read with train.distributed=deepspeed"),
])
def test_settings_that_cannot_work_fail_with_one_message(tree, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, stage in (("ZERO2", 2), ("ZERO3", 3)):
        (tmp_path / name).write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    with pytest.raises(ConfigError, match=message):
        check_distributed(_cfg(**tree), processes=2)


def test_strategy_defaults_to_ddp_with_several_processes_and_fsdp_takes_the_sharded_methods():
    assert check_distributed(_cfg(), processes=2) == "ddp"
    assert check_distributed(_cfg(), processes=1) == "single"
    for method in ("full", "freeze", "lora", "dora", "houlsby"):
        assert check_distributed(_cfg(train={"distributed": "fsdp"}, method={"type": method}), processes=2) == "fsdp"


def test_estimate_gives_fsdp_ranks_a_share_of_the_weights(job):
    """`tunelab estimate --gpus 2` of an fsdp run: weights per rank halved (ZeRO-3's model), ddp's whole."""
    per_rank = {}
    for strategy in ("ddp", "fsdp"):
        config = job(f"estimate-{strategy}", "full", 1, strategy)
        per_rank[strategy] = estimate_main(str(config), [], "cuda:80GB", 2, 0, measure=False, as_json=True,
                                           echo=lambda line: None)
    assert (per_rank["ddp"]["zero_stage"], per_rank["fsdp"]["zero_stage"]) == (0, 3)
    assert per_rank["fsdp"]["breakdown"]["weights"] == pytest.approx(per_rank["ddp"]["breakdown"]["weights"] / 2)


def test_a_world_larger_than_an_epoch_of_micro_batches_is_refused():
    cfg = _cfg(train={"batch_size": 4})
    check_world_for_data(2, cfg, processes=2)
    with pytest.raises(ConfigError, match="2 processes but the training data makes only 1 micro-batch"):
        check_world_for_data(1, cfg, processes=2)


def test_nproc_per_node_refuses_a_bad_setting_before_launching(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}, "method": {"type": "prefix"},
                                      "data": {"train": ["none.jsonl"]}, "train": {"distributed": "fsdp"},
                                      "output_dir": str(tmp_path / "out")}))
    result = CliRunner().invoke(app, ["train", str(config), "--nproc-per-node", "2"])
    assert result.exit_code == 2 and "cannot train method 'prefix'" in result.output
    assert not (tmp_path / "out").exists()
    assert strip_launcher_flag(["train", "c.yaml", "--nproc-per-node", "2", "--resume"]) == ["train", "c.yaml",
                                                                                              "--resume"]
    assert strip_launcher_flag(["train", "c.yaml", "--nproc-per-node=4"]) == ["train", "c.yaml"]
