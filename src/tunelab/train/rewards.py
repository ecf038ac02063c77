"""Where PPO's sequence-level reward comes from: a trained reward model, or a Python function.

A reward model (``ppo.reward_model: RUN``, a finished ``stage: rm`` run) is NOT loaded as a
second model: its PEFT adapter is added to the policy's own PEFT model as a second named
adapter on the same frozen base, and its value head is loaded beside it. Scoring switches
the active adapter to the reward model's for one forward pass and back. So PPO holds one
copy of the base weights for policy, reference (adapters off), critic (a head on the
policy's hidden states) and reward model.

A rule reward (``ppo.reward_fn: "module:function"``) is any function
``fn(prompts: list[str], responses: list[str]) -> list[float]``; the module is imported
from the current directory or its ``examples/`` folder, then the normal import path.
"""

from __future__ import annotations

import importlib
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from tunelab.config import PPOConfig, RunConfig, load_run_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods.peft_common import ADAPTER_NAME, require_adapter
from tunelab.train.reference import eval_mode
from tunelab.train.rollout import Rollout
from tunelab.train.value_head import hidden_size_of, load_value_head, sequence_scores

#: The name of the reward model's adapter inside the policy's PEFT model.
REWARD_ADAPTER = "reward"

RewardFn = Callable[[list[str], list[str]], list[float]]


class RewardSource(Protocol):
    def score(self, rollout: Rollout, batch_size: int) -> torch.Tensor:
        """One fp32 score per rollout row, on the rollout's device."""

    def release(self) -> None:
        """Remove anything attached to the policy before it is saved."""


# ------------------------------------------------------------------------------ rule rewards

@contextmanager
def _import_paths(*paths: Path) -> Iterator[None]:
    added = [str(p) for p in paths if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for path in added:
            sys.path.remove(path)


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``"module:function"`` (from the current directory, ``examples/``, or installed)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"ppo.reward_fn = {spec!r} is not of the form 'module:function'. Example: "
                          "ppo.reward_fn=rewards:friendly_reward (rewards.py in the current directory or in "
                          "examples/).")
    cwd = Path.cwd()
    try:
        with _import_paths(cwd, cwd / "examples"):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"ppo.reward_fn = {spec!r}: module '{module_name}' cannot be imported ({err}). Put "
                          f"{module_name}.py in the current directory ({cwd}) or in {cwd / 'examples'}, or install "
                          "it.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"ppo.reward_fn = {spec!r}: module '{module_name}' ({module.__file__}) has no function "
                          f"'{attr}'. Define def {attr}(prompts, responses) -> list[float] there.")
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
    reward_cfg = load_run_config(run_dir)
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
