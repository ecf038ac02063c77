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
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.inference import LoadedRun, stop_token_ids
from tunelab.models.forward import Batch, hidden_states
from tunelab.models.value_head import ValueHead, attach_value_head, save_value_head
from tunelab.train.lifecycle import RolloutTrainer, StepOutput
from tunelab.train.losses import token_logps
from tunelab.train.reference import ReferenceModel
from tunelab.train.rewards import RewardSource, build_reward, check_reward_choice
from tunelab.train.rl_math import (entropy_from_logits, gae, kl_penalised_rewards, masked_whiten, ppo_policy_loss,
                                   ppo_value_loss)
from tunelab.train.rollout import Rollout, generation_config, sample_rollout


def check_ppo_config(cfg: RunConfig) -> None:
    """Refuse settings PPO cannot honour, before anything is loaded."""
    check_reward_choice(cfg.ppo)
    dropout = getattr(cfg.method, "dropout", 0.0)  # only the LoRA family has adapter dropout
    if dropout:
        raise ConfigError(f"stage ppo needs method.dropout=0 (it is {dropout}): the policy that samples "
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


class PPOTrainer(RolloutTrainer):
    """One PPO run: policy, critic, reward and reference on one base; each step a rollout and its updates."""

    @staticmethod
    def check_config(cfg: RunConfig) -> None:
        check_ppo_config(cfg)

    def prompts_per_step(self) -> int:
        return self.cfg.ppo.rollout_batch_size

    def updates_per_step(self) -> int:
        return self.cfg.ppo.ppo_epochs * math.ceil(self.cfg.ppo.rollout_batch_size / self.cfg.ppo.mini_batch_size)

    def attach(self, model: nn.Module) -> None:
        """Reference (the adapter switched off), critic head and reward source, all on the policy's base."""
        cfg = self.cfg
        self.policy = model
        self.reference = ReferenceModel(self.method, model, cfg.pref.ref_on_cpu)
        self.value_head = attach_value_head(model)
        self.reward: RewardSource = build_reward(cfg, model)
        loaded = LoadedRun(model, self.tokenizer, self.data.template, cfg, self.method, str(self.run_dir.root))
        self.generation = generation_config(cfg.ppo, stop_token_ids(loaded), self.tokenizer.pad_token_id)
        self.micro = min(cfg.train.batch_size, cfg.ppo.mini_batch_size)
        # Optimizer updates so far (AdaLoRA's schedule counts them): set from the step on the first update,
        # so a resumed run continues the count.
        self.updates_done: int | None = None

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
        if self.updates_done is None:
            self.updates_done = self.state.step * self.updates_per_step()
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

    # -- the step --------------------------------------------------------------------------
    def step(self) -> StepOutput:
        """Steps 1-5 of the module docstring for one batch of prompts."""
        exp = self.collect(self.next_batch())
        stats = self.update(exp)
        scores = exp.scores.float()
        return StepOutput(exp.rollout.tokens, {
            "loss": stats["loss"], "reward_mean": float(scores.mean()), "reward_std": float(scores.std(unbiased=False)),
            "kl": float(exp.kl.mean()), "entropy": exp.entropy, "clipfrac": stats["clipfrac"],
            "value_loss": stats["value_loss"]})

    def announce(self) -> list[str]:
        return [f"ppo with method {self.method.name}: {self.trainable_params:,} trainable of {self.total_params:,} "
                f"parameters; {len(self.data.train)} prompts; {self.total_steps} steps of "
                f"{self.cfg.ppo.rollout_batch_size} rollouts"]

    def save_outputs(self, model: nn.Module) -> None:
        """The reward adapter leaves the policy before it is saved; the critic head is saved beside it."""
        self.reward.release()
        save_value_head(self.value_head, self.run_dir.root)

