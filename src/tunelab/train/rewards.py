"""Where PPO's sequence-level reward comes from: a trained reward model, or a Python function.

A reward model (``ppo.reward_model: RUN``, a finished ``stage: rm`` run) is NOT loaded as a
second model: its PEFT adapter is added to the policy's own PEFT model as a second named
adapter on the same frozen base, and its value head is loaded beside it. Scoring switches
the active adapter to the reward model's for one forward pass and back. So PPO holds one
copy of the base weights for policy, reference (adapters off), critic (a head on the
policy's hidden states) and reward model.

A rule reward (``ppo.reward_fn``) is any function
``fn(prompts: list[str], responses: list[str]) -> list[float]``, named as
``"module:function"`` (an installed module, found by the normal import system) or as
``"path/to/file.py:function"`` (that file, relative to the current directory). A file in
the current directory is never found by module name, so it cannot stand in for an
installed package (a stray ``json.py`` next to the config).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from tunelab.config import PPOConfig, RunConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods.peft_common import ADAPTER_NAME, require_adapter
from tunelab.runs import RunDir
from tunelab.train.reference import eval_mode
from tunelab.train.rollout import Rollout
from tunelab.models.value_head import hidden_size_of, load_value_head, sequence_scores

#: The name of the reward model's adapter inside the policy's PEFT model.
REWARD_ADAPTER = "reward"

RewardFn = Callable[[list[str], list[str]], list[float]]


class RewardSource(Protocol):
    def score(self, rollout: Rollout, batch_size: int) -> torch.Tensor:
        """One fp32 score per rollout row, on the rollout's device."""

    def release(self) -> None:
        """Remove anything attached to the policy before it is saved."""


# ------------------------------------------------------------------------------ rule rewards

def _is_working_directory(entry: str, index: int, cwd: Path) -> bool:
    """Whether ``sys.path[index]`` is the working directory that Python itself put there: ``''``
    (``python -c``, REPLs, notebooks) or, first, the directory of ``python -m``."""
    if entry in ("", "."):
        return True
    try:
        return index == 0 and Path(entry).resolve() == cwd
    except OSError:
        return False


@contextmanager
def _working_directory_hidden() -> Iterator[None]:
    """Import without the working directory on ``sys.path``, so a local file never shadows an
    installed module; entries the imported module adds are kept."""
    cwd = Path.cwd().resolve()
    saved = list(sys.path)
    sys.path[:] = [entry for i, entry in enumerate(saved) if not _is_working_directory(entry, i, cwd)]
    try:
        yield
    finally:
        sys.path[:] = saved + [entry for entry in sys.path if entry not in saved]


def _installed_module(name: str, spec: str, setting: str) -> ModuleType:
    try:
        with _working_directory_hidden():
            return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name != err.name and not name.startswith(f"{err.name}."):
            raise ConfigError(f"{setting} = {spec!r}: module '{name}' imports '{err.name}', which is not installed. "
                              f"Install it (pip install ...) in this environment.") from None
        top = name.split(".")[0]
        cwd = Path.cwd()
        local = next((p for p in (cwd / f"{top}.py", cwd / "examples" / f"{top}.py") if p.is_file()), None)
        hint = (f"To use the file {local}, name the file: {setting}={local.relative_to(cwd)}:{spec.rpartition(':')[2]}."
                if local else f"Install it, or name a file instead: {setting}=path/to/{top}.py:function.")
        raise ConfigError(f"{setting} = {spec!r}: module '{name}' cannot be imported ({err}); a module name is "
                          f"looked up among installed packages only. {hint}") from None


def _file_module(source: str, spec: str, setting: str) -> ModuleType:
    """Execute the file ``source`` as a module of its own (a private name, so it shadows nothing)."""
    path = Path(source).expanduser()
    if path.suffix != ".py" or not path.is_file():
        problem = "is not a .py file" if path.suffix != ".py" else "does not exist"
        raise ConfigError(f"{setting} = {spec!r}: {path} {problem} (a relative path is read from the current "
                          f"directory, {Path.cwd()}). Name a Python file as path/to/file.py:function, or an installed "
                          "module as module:function.")
    resolved = path.resolve()
    name = f"_tunelab_reward_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    assert module_spec is not None and module_spec.loader is not None  # a .py file always has a source loader
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # while it runs, as an import would (dataclasses and pickle look it up)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        del sys.modules[name]
        raise ConfigError(f"{setting} = {spec!r}: {err.filename}, line {err.lineno}: {err.msg}. Fix the syntax "
                          "error in that file.") from None
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_reward_fn(spec: str, setting: str = "ppo.reward_fn") -> RewardFn:
    """The function named by ``spec``: ``"module:function"`` (installed) or ``"path/to/file.py:function"``.

    ``setting`` is the config key ``spec`` came from, named in errors.
    """
    source, _, attr = spec.rpartition(":")
    if not source or not attr.isidentifier():
        raise ConfigError(f"{setting} = {spec!r} is not of the form 'module:function' or 'path/to/file.py:function'. "
                          f"Example: {setting}=examples/rewards.py:friendly.")
    as_file = source.endswith(".py") or "/" in source or os.sep in source
    module = _file_module(source, spec, setting) if as_file else _installed_module(source, spec, setting)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{setting} = {spec!r}: {module.__file__} has no function '{attr}'. Define "
                          f"def {attr}(prompts, responses) -> list[float] there.")
    return fn


class RuleReward:
    """Scores from a Python function of the prompt and response texts."""

    def __init__(self, fn: RewardFn, spec: str):
        self.fn, self.spec = fn, spec

    def score(self, rollout: Rollout, batch_size: int) -> torch.Tensor:
        values = self.fn(list(rollout.prompts), list(rollout.responses))
        try:
            scores = [float(v) for v in values]
        except (TypeError, ValueError):
            raise TunelabError(f"ppo.reward_fn {self.spec} returned {type(values).__name__} {values!r:.200}; it "
                               "must return a list of numbers, one per response.") from None
        bad = next((i for i, v in enumerate(scores) if not math.isfinite(v)), None)
        if len(scores) != rollout.size or bad is not None:
            problem = (f"{len(scores)} scores for {rollout.size} responses" if len(scores) != rollout.size
                       else f"a non-finite score {scores[bad]} for response {bad} ({rollout.responses[bad]!r:.80})")
            raise TunelabError(f"ppo.reward_fn {self.spec} returned {problem}. It must return one finite float per "
                               "response, in order.")
        return torch.tensor(scores, dtype=torch.float32, device=rollout.input_ids.device)

    def release(self) -> None:
        """Nothing is attached to the policy."""


# ------------------------------------------------------------------------------ reward models

@contextmanager
def using_adapter(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Make adapter ``name`` the active one inside the block, then switch back.

    PEFT's ``set_adapter`` also rewrites ``requires_grad`` of adapter weights; the flags
    are restored exactly afterwards so the optimizer's view of the policy never changes.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(ADAPTER_NAME)
        for param, flag in flags:
            param.requires_grad_(flag)


def _check_reward_run(run_dir: Path, cfg: RunConfig) -> RunConfig:
    reward_cfg = RunDir(run_dir).read_config()
    if reward_cfg.stage != "rm":
        raise ConfigError(f"ppo.reward_model = {run_dir} is a '{reward_cfg.stage}' run, not a reward model. Pass "
                          "the output_dir of a `stage: rm` run, or use ppo.reward_fn.")
    same_base = (reward_cfg.model.name_or_path, reward_cfg.model.gguf_file) == (cfg.model.name_or_path,
                                                                                cfg.model.gguf_file)
    if not same_base:
        raise ConfigError(f"ppo.reward_model = {run_dir} was trained on model '{reward_cfg.model.name_or_path}', but "
                          f"this run trains '{cfg.model.name_or_path}'. The reward adapter shares the policy's base "
                          "weights, so both must use the same model.name_or_path.")
    for key in ("template", "system"):
        theirs, ours = getattr(reward_cfg.data, key), getattr(cfg.data, key)
        if theirs != ours:
            raise ConfigError(f"ppo.reward_model = {run_dir} was trained with data.{key}={theirs!r}, this run renders "
                              f"prompts with data.{key}={ours!r}. Set data.{key} to the reward model's value so it "
                              "scores text laid out as it was trained on.")
    return reward_cfg


def _check_policy(policy: nn.Module, adapter_path: Path) -> None:
    from peft import PeftConfig, PeftModel

    own = policy.peft_config.get(ADAPTER_NAME) if isinstance(policy, PeftModel) else None
    if own is None or own.is_prompt_learning:
        raise ConfigError("ppo.reward_model adds the reward model's adapter beside the policy's on one base model, "
                          "which needs a LoRA-family policy (method.type lora, dora, rslora, ...). Train the policy "
                          "with such a method, or score with ppo.reward_fn instead.")
    theirs = PeftConfig.from_pretrained(str(adapter_path))
    if theirs.peft_type != own.peft_type:
        raise ConfigError(f"ppo.reward_model: the reward adapter in {adapter_path} is {theirs.peft_type}, the "
                          f"policy's is {own.peft_type}; PEFT holds only adapters of one type on a model. Train "
                          "the reward model and the policy with the same adapter family.")


class ModelReward:
    """Scores from a trained reward model sharing the policy's base (see the module docstring)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, policy: nn.Module):
        _check_reward_run(run_dir, cfg)
        path = require_adapter(run_dir, "ppo.reward_model")
        _check_policy(policy, path)
        self.policy = policy
        device = next(policy.parameters()).device
        policy.load_adapter(str(path), adapter_name=REWARD_ADAPTER, is_trainable=False)
        self.head = load_value_head(run_dir, hidden_size_of(policy), device)

    @torch.no_grad()
    def score(self, rollout: Rollout, batch_size: int) -> torch.Tensor:
        scores = []
        with using_adapter(self.policy, REWARD_ADAPTER), eval_mode(self.policy):
            for index in torch.arange(rollout.size, device=rollout.input_ids.device).split(batch_size):
                scores.append(sequence_scores(self.policy, self.head, rollout.rows(index)))
        return torch.cat(scores)

    def release(self) -> None:
        """Drop the reward adapter so the policy's saved adapter directory holds the policy only."""
        self.policy.delete_adapter(REWARD_ADAPTER)


def check_reward_choice(ppo: PPOConfig) -> None:
    """Exactly one of ``ppo.reward_model`` and ``ppo.reward_fn`` must be set."""
    if (ppo.reward_model is None) == (ppo.reward_fn is None):
        given = "both are set" if ppo.reward_model else "neither is set"
        raise ConfigError(f"stage ppo needs exactly one reward: ppo.reward_model (a trained `stage: rm` run "
                          f"directory) or ppo.reward_fn ('module:function'), but {given}.")


def build_reward(cfg: RunConfig, policy: nn.Module) -> RewardSource:
    """The reward named by ``ppo.reward_model`` or ``ppo.reward_fn`` (exactly one must be set)."""
    ppo = cfg.ppo
    check_reward_choice(ppo)
    if ppo.reward_fn is not None:
        return RuleReward(load_reward_fn(ppo.reward_fn), ppo.reward_fn)
    return ModelReward(Path(ppo.reward_model), cfg, policy)  # type: ignore[arg-type]
