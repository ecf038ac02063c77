"""PPO for RLHF (stage ``ppo``): rollouts, rewards, KL to the reference, GAE, clipped updates.

The recipe is InstructGPT's (Ouyang et al. 2022, after Ziegler et al. 2019) with the
implementation details of Huang et al. 2024 ("The N+ Implementation Details of RLHF with
PPO"); the maths is in :mod:`tunelab.train.rl_math`. Each step:

1. take ``ppo.rollout_batch_size`` prompts (deterministic order, as in the batch loop);
2. sample one answer per prompt from the policy (temperature / top-k / top-p);
3. without gradients: the policy's log-probs and values, the reference's log-probs, and
   the score (reward model or rule function);
4. the scores optionally scaled to unit variance (:func:`scale_scores`); per-token rewards
   ``-kl_coef (log pi - log pi_ref)`` plus the score on the last token; GAE; whitened
   advantages;
5. ``ppo.ppo_epochs`` passes over shuffled minibatches of ``ppo.mini_batch_size`` rollouts:
   clipped policy loss + ``vf_coef`` x clipped value loss, gradient clipping, one optimizer
   step per minibatch (micro-batches of ``train.batch_size`` rows accumulate exactly,
   weighted by their response tokens).

Memory: ONE frozen base model. The policy is the method's adapter; the reference is the
same module with adapters off (``method.reference``; full/freeze keep a frozen copy);
the critic is a value head on the policy's own final hidden states (a shared trunk: no
second network, at the price that value-loss gradients also move the policy's adapter,
which ``ppo.vf_coef`` keeps small); the reward model is a second adapter on the same base
(:mod:`tunelab.train.rewards`).

Dropout must be off (``method.dropout: 0``): the PPO ratio pi_new / pi_old has to be
exactly 1 before the first update, so rollouts and updates must see the same network.
Log-probs are taken at the sampling temperature; top-k / top-p truncation is not
reflected in them (as in common PPO implementations).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.config import RunConfig, save_config
from tunelab.data.pipeline import build_data
from tunelab.errors import ConfigError, TunelabError
from tunelab.inference import LoadedRun, stop_token_ids
from tunelab.methods.base import count_parameters, get_method
from tunelab.train.checkpoint import (TrainState, checkpoint_if_due, list_checkpoints, load_checkpoint,
                                     save_checkpoint)
from tunelab.train.loop import (MicroBatches, StopFlag, TrainResult, check_run_dir, enable_gradient_checkpointing,
                                load_training_base)
from tunelab.train.losses import token_logps
from tunelab.train.monitor import Monitor, peak_memory_bytes
from tunelab.train.objectives import Batch, hidden_states
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.reference import ReferenceModel
from tunelab.train.rewards import RewardSource, build_reward, check_reward_choice
from tunelab.train.rl_math import (entropy_from_logits, gae, kl_penalised_rewards, masked_whiten, ppo_policy_loss,
                                   ppo_value_loss)
from tunelab.train.rollout import Rollout, generation_config, sample_rollout
from tunelab.train.runtime import make_accelerator
from tunelab.train.value_head import ValueHead, attach_value_head, save_value_head


def check_ppo_config(cfg: RunConfig) -> None:
    """Refuse settings PPO cannot honour, before anything is loaded."""
    check_reward_choice(cfg.ppo)
    if cfg.method.dropout:
        raise ConfigError(f"stage ppo needs method.dropout=0 (it is {cfg.method.dropout}): the policy that samples "
                          "and the policy that is updated must be the same network, or the PPO ratio is wrong "
                          "from the first update on.")
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"stage ppo takes one optimizer step per minibatch of ppo.mini_batch_size rollouts; "
                          f"train.grad_accum={cfg.train.grad_accum} has no meaning there. Set train.grad_accum=1 "
                          "(train.batch_size sets the micro-batch rows that are accumulated within a minibatch).")
    if cfg.ppo.mini_batch_size > cfg.ppo.rollout_batch_size:
        raise ConfigError(f"ppo.mini_batch_size ({cfg.ppo.mini_batch_size}) is larger than ppo.rollout_batch_size "
                          f"({cfg.ppo.rollout_batch_size}); a minibatch is a subset of one rollout. Lower it.")


class _Tempered(nn.Module):
    """The LM head divided by the sampling temperature: the distribution the policy samples."""

    def __init__(self, head: nn.Module, temperature: float):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(rows) / self.temperature


def _tempered(head: nn.Module, temperature: float) -> nn.Module:
    return head if temperature == 1.0 else _Tempered(head, temperature)


@dataclass
class ResponseOutputs:
    """Per response token [n, R]: log-prob under the model; value and entropy sum when asked."""

    logprobs: torch.Tensor
    values: torch.Tensor | None = None
    entropy_sum: float = 0.0


def _predicting(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Hidden states [n, R, H] at the positions that predict each response token."""
    index = (batch["positions"] - 1).clamp(min=0)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@torch.no_grad()
def _entropy_sum(head: nn.Module, rows: torch.Tensor, chunk_size: int) -> float:
    """Summed entropy of the next-token distributions at ``rows`` [n, H], one chunk of logits at a time."""
    total = 0.0
    for piece in rows.split(chunk_size if chunk_size > 0 else max(len(rows), 1)):
        ones = torch.ones(1, piece.shape[0], dtype=torch.bool, device=piece.device)
        total += float(entropy_from_logits(head(piece).unsqueeze(0), ones)) * piece.shape[0]
    return total


def response_outputs(model: nn.Module, batch: Batch, temperature: float, chunk_size: int,
                     value_head: ValueHead | None = None, entropy: bool = False) -> ResponseOutputs:
    """Log-probs (and values, entropy) of the response tokens of a rollout batch.

    The value of response token t is read where token t is predicted (the state before
    it is chosen), the same position its log-prob comes from.
    """
    hidden, head = hidden_states(model, batch)
    head = _tempered(head, temperature)
    mask = batch["response_mask"]
    logprobs = token_logps(hidden, head, batch["labels"], chunk_size).gather(1, batch["positions"]) * mask
    rows = _predicting(hidden, batch)
    values = value_head(rows) * mask if value_head is not None else None
    entropy_sum = _entropy_sum(head, rows[mask], chunk_size) if entropy else 0.0
    return ResponseOutputs(logprobs, values, entropy_sum)


def scale_scores(scores: torch.Tensor, whiten: bool) -> torch.Tensor:
    """``ppo.whiten_rewards``: the rollout's scores scaled to unit variance, their mean kept.

    Whitening without the shift (Huang et al. 2024) makes the reward scale, and so the
    weight of ``kl_coef``, independent of the reward model or function while keeping
    whether answers are on the whole good or bad. It is applied to the sequence scores
    before the KL shaping, not to the per-token rewards: those are mostly tiny KL terms,
    and scaling them to unit variance would turn the KL noise into the main signal
    whenever the scores of a rollout barely differ.
    """
    if not whiten:
        return scores
    return masked_whiten(scores, torch.ones_like(scores, dtype=torch.bool), shift_mean=False)


@dataclass
class Experience:
    """A scored rollout with everything the PPO updates need ([N, R] unless noted)."""

    rollout: Rollout
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # [N]
    kl: torch.Tensor  # [N] summed per-token KL estimate
    entropy: float


class PPOTrainer:
    """One PPO run: load, attach policy/critic/reward/reference, iterate, checkpoint, save."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True):
        check_ppo_config(cfg)
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.run_dir = Path(cfg.output_dir)
        check_run_dir(self.run_dir, resume, overwrite)
        self.accelerator = make_accelerator(cfg.train.precision)
        self.device = self.accelerator.device
        torch.manual_seed(cfg.train.seed)
        self.method = get_method(cfg.method)
        base, self.tokenizer = load_training_base(cfg, self.accelerator, self.method)
        self.data = build_data(cfg, self.tokenizer)
        self.stream = MicroBatches([len(e.prompt_ids) for e in self.data.train], cfg.ppo.rollout_batch_size,
                                   cfg.train.seed, group_by_length=False)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.stream.per_epoch))
        self.updates_per_step = cfg.ppo.ppo_epochs * math.ceil(cfg.ppo.rollout_batch_size / cfg.ppo.mini_batch_size)
        self.method.configure_schedule(self.total_steps * self.updates_per_step)
        self.policy = self.method.apply(base, self.tokenizer)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy, self.method)
        self.reference = ReferenceModel(self.method, self.policy, cfg.pref.ref_on_cpu)
        self.value_head = attach_value_head(self.policy)
        self.reward: RewardSource = build_reward(cfg, self.policy)
        optimizer = build_optimizer(self.method.param_groups(self.policy, cfg.train), cfg.train)
        self.scheduler = build_scheduler(optimizer, cfg.train, self.total_steps * self.updates_per_step)
        self.model, self.optimizer = self.accelerator.prepare(self.policy, optimizer)
        loaded = LoadedRun(self.policy, self.tokenizer, self.data.template, cfg, self.method, str(self.run_dir))
        pad_id = self.tokenizer.pad_token_id
        self.generation = generation_config(cfg.ppo, stop_token_ids(loaded), pad_id)
        self.micro = min(cfg.train.batch_size, cfg.ppo.mini_batch_size)
        self.trainable_params, self.total_params = count_parameters(self.policy)
        self.state = TrainState()
        self.updates_done = 0

    # -- experience --------------------------------------------------------------------
    def _row_chunks(self, size: int, device: torch.device) -> list[torch.Tensor]:
        return list(torch.arange(size, device=device).split(self.micro))

    @torch.no_grad()
    def collect(self, indices: list[int]) -> Experience:
        """Sample, score and evaluate one rollout (steps 2-4 of the module docstring)."""
        ppo, chunk = self.cfg.ppo, self.cfg.train.loss_chunk_size
        self.policy.eval()
        with self.accelerator.autocast():
            rollout = sample_rollout(self.policy, [self.data.train[i] for i in indices], self.tokenizer,
                                     self.generation, self.device)
            logprobs, values, ref_logprobs, entropy_sum = [], [], [], 0.0
            for index in self._row_chunks(rollout.size, self.device):
                batch = rollout.rows(index)
                out = response_outputs(self.policy, batch, ppo.temperature, chunk, self.value_head, entropy=True)
                logprobs.append(out.logprobs)
                values.append(out.values)
                entropy_sum += out.entropy_sum
                ref_logprobs.append(self.reference.run(
                    lambda ref, b: response_outputs(ref, b, ppo.temperature, chunk).logprobs, batch))
            scores = self.reward.score(rollout, self.micro)
        old_logprobs, old_values, ref = (torch.cat(x) for x in (logprobs, values, ref_logprobs))
        mask = rollout.mask
        rewards, kl = kl_penalised_rewards(scale_scores(scores, ppo.whiten_rewards), old_logprobs, ref, mask,
                                           ppo.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask)
        return Experience(rollout, old_logprobs, old_values, advantages, returns, scores, kl,
                          entropy_sum / max(int(mask.sum()), 1))

    # -- updates ------------------------------------------------------------------------
    def _minibatch(self, exp: Experience, rows: torch.Tensor) -> dict[str, float]:
        """Accumulate the PPO loss over micro-batches of ``rows`` (token-weighted), then step."""
        ppo, chunk = self.cfg.ppo, self.cfg.train.loss_chunk_size
        mask = exp.rollout.mask
        total_tokens = max(int(mask[rows].sum()), 1)
        sums = {"loss": 0.0, "clipfrac": 0.0, "value_loss": 0.0}
        for index in rows.split(self.micro):
            batch = exp.rollout.rows(index)
            weight = int(mask[index].sum()) / total_tokens
            with self.accelerator.autocast():
                out = response_outputs(self.model, batch, ppo.temperature, chunk, self.value_head)
                policy_loss, clipfrac, _ = ppo_policy_loss(out.logprobs, exp.old_logprobs[index],
                                                           exp.advantages[index], mask[index], ppo.cliprange)
                value_loss, _ = ppo_value_loss(out.values, exp.old_values[index], exp.returns[index], mask[index],
                                               ppo.cliprange_value)
                loss = policy_loss + ppo.vf_coef * value_loss
            self.accelerator.backward(loss * weight)
            for key, value in (("loss", loss), ("clipfrac", clipfrac), ("value_loss", value_loss)):
                sums[key] += float(value.detach()) * weight
        if self.cfg.train.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                             self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.updates_done += 1
        self.method.on_optimizer_step(self.policy, self.updates_done)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled minibatches; returns the mean loss statistics."""
        self.model.train()  # dropout is 0 (checked); train mode lets gradient checkpointing run
        totals: dict[str, float] = {}
        count = 0
        for _ in range(self.cfg.ppo.ppo_epochs):
            order = torch.randperm(exp.rollout.size, device=self.device)
            for rows in order.split(self.cfg.ppo.mini_batch_size):
                for key, value in self._minibatch(exp, rows).items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
        self.model.eval()
        return {key: value / count for key, value in totals.items()}

    # -- the run ------------------------------------------------------------------------
    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        if self.resume:
            checkpoints = list_checkpoints(self.run_dir)
            if not checkpoints:
                raise TunelabError(f"--resume: {self.run_dir}/checkpoints holds no checkpoint to resume from. "
                                   "Run without --resume, or set train.save_every so checkpoints are written.")
            self.state = load_checkpoint(checkpoints[-1], self.policy, self.optimizer, self.scheduler)
        self.updates_done = self.state.step * self.updates_per_step

    def step_row(self, exp: Experience, stats: dict[str, float], seconds: float) -> dict[str, Any]:
        """The metrics.jsonl line of one PPO step."""
        scores = exp.scores.float()
        return {"step": self.state.step, "loss": stats["loss"], "reward_mean": float(scores.mean()),
                "reward_std": float(scores.std(unbiased=False)), "kl": float(exp.kl.mean()),
                "entropy": exp.entropy, "clipfrac": stats["clipfrac"], "value_loss": stats["value_loss"],
                "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": exp.rollout.tokens / max(seconds, 1e-9)}

    def run(self) -> TrainResult:
        self._start()
        is_main = self.accelerator.is_main_process
        monitor = Monitor(self.run_dir, self.total_steps, self.state.step, enabled=is_main, progress=self.progress)
        if is_main:
            monitor.write(f"ppo with method {self.method.name}: {self.trainable_params:,} trainable of "
                          f"{self.total_params:,} parameters; {len(self.data.train)} prompts; {self.total_steps} "
                          f"steps of {self.cfg.ppo.rollout_batch_size} rollouts")
        stream = self.stream.iterate(self.state.epoch, self.state.batch_in_epoch)
        started = time.perf_counter()
        total_tokens, last, interrupted = 0, {}, False
        with StopFlag() as stop:
            while self.state.step < self.total_steps:
                step_start = time.perf_counter()
                epoch, index, indices = next(stream)
                self.state.epoch, self.state.batch_in_epoch = epoch, index + 1
                exp = self.collect(indices)
                stats = self.update(exp)
                self.state.step += 1
                self.state.tokens_seen += exp.rollout.tokens
                total_tokens += exp.rollout.tokens
                monitor.advance()
                last = self.step_row(exp, stats, time.perf_counter() - step_start)
                if self.state.step % self.cfg.train.log_every == 0 or self.state.step == self.total_steps:
                    monitor.log(last)
                if checkpoint_if_due(self.state.step, self.cfg.train.save_every, stop.requested, self._checkpoint,
                                     monitor.write):
                    interrupted = True
                    break
        wall = time.perf_counter() - started
        if not interrupted:
            self.save()
        monitor.close()
        return TrainResult(run_dir=self.run_dir, steps=self.state.step, final_loss=last.get("loss"), eval_loss=None,
                           interrupted=interrupted, trainable_params=self.trainable_params,
                           total_params=self.total_params, tokens_per_s=total_tokens / max(wall, 1e-9),
                           peak_memory_bytes=peak_memory_bytes(self.device), wall_s=wall, last_metrics=last)

    def _checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(self.run_dir, self.policy, self.optimizer, self.scheduler, self.state,
                            self.cfg.train.keep_last)

    def save(self) -> None:
        """Policy adapter (the method's format), value head, tokenizer and resolved config."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        self.reward.release()
        self.method.save(self.policy, self.run_dir)
        save_value_head(self.value_head, self.run_dir)
        self.tokenizer.save_pretrained(self.run_dir)
        save_config(self.cfg, self.run_dir / "config.yaml")


def train_ppo(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train stage ``ppo`` described by ``cfg``; see :class:`PPOTrainer`."""
    if cfg.stage != "ppo":
        raise ConfigError(f"train_ppo runs stage 'ppo', but the config says stage '{cfg.stage}'.")
    return PPOTrainer(cfg, resume=resume, overwrite=overwrite, progress=progress).run()
