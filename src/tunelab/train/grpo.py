"""The GRPO family (stage ``grpo``): groups of sampled answers, rule rewards, clipped updates.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) and its successors
(DAPO, Dr. GRPO, GSPO, RLOO; the maths and citations are in :mod:`tunelab.train.grpo_math`).
Each step:

1. take ``grpo.prompts_per_step`` prompts (deterministic order, as in every loop);
2. sample ``grpo.num_generations`` completions of each in one batched ``generate`` call
   (KV cache; temperature / top-k / top-p);
3. score every completion with each reward function of ``grpo.reward_fns`` (TRL's calling
   convention, :mod:`tunelab.train.reward_fns`) and take the weighted total;
4. advantages relative to the group (``grpo.advantage``, ``grpo.scale_rewards``); no critic;
5. without gradients, only what the settings need: the sampling policy's log-probs (kept
   when ``grpo.num_iterations > 1``, else the ratio is exactly 1) and the reference's
   (when ``grpo.beta > 0``);
6. ``grpo.num_iterations`` optimizer updates on all completions, micro-batches of
   ``train.batch_size`` rows accumulated exactly (:class:`~tunelab.train.grpo_math.StepScope`).

Memory: ONE base model. The policy is the method's adapter (or the full weights); the
reference, needed only when ``beta > 0``, is the adapter switched off (full/freeze keep a
frozen copy, optionally on the CPU with ``pref.ref_on_cpu``); there is no value network and
no reward model. Dropout must be off, for the reason PPO gives (:mod:`tunelab.train.ppo`);
log-probs are taken at the sampling temperature.

The record's reference answer (the alpaca response column, the conversation's final
assistant turn) reaches reward functions as the keyword ``solution``, the name TRL's math
rewards use.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from tunelab.config import GRPOConfig, RunConfig
from tunelab.data.records import IGNORE_INDEX, PromptExample
from tunelab.errors import ConfigError
from tunelab.inference import LoadedRun, stop_token_ids
from tunelab.train.grpo_math import StepScope, equal_reward_groups, group_advantages, policy_loss
from tunelab.train.distributed import world_size
from tunelab.train.lifecycle import RolloutTrainer, StepOutput
from tunelab.train.ppo import response_outputs
from tunelab.train.reference import ReferenceModel
from tunelab.train.reward_fns import resolve_rewards, reward_metrics, score_rewards, total_reward
from tunelab.train.rollout import Rollout, generation_config, sample_rollout
from tunelab.train.vllm_rollout import VllmSampler, rollout_backend


class ClipRange(NamedTuple):
    """The ratio clip of a run: ``1 - low`` to ``1 + high``."""

    low: float
    high: float


def clip_range(grpo: GRPOConfig) -> ClipRange:
    """``grpo.epsilon`` / ``epsilon_high``, null resolved per loss.

    GSPO's ratio is a per-token geometric mean and sits far closer to 1 than a token
    ratio, so its paper clips at 3e-4 / 4e-4; DAPO's clip-higher raises the upper bound
    to 0.28 so that unlikely tokens with a positive advantage can still grow.
    """
    low = grpo.epsilon if grpo.epsilon is not None else 3e-4 if grpo.loss == "gspo" else 0.2
    default_high = {"gspo": 4e-4, "dapo": 0.28}.get(grpo.loss, low)
    return ClipRange(low, grpo.epsilon_high if grpo.epsilon_high is not None else default_high)


def scales_rewards(grpo: GRPOConfig) -> bool:
    """``grpo.scale_rewards``, null resolved: Dr. GRPO's point is not dividing by the group std."""
    return grpo.scale_rewards if grpo.scale_rewards is not None else grpo.loss != "dr_grpo"


def check_grpo_config(cfg: RunConfig) -> None:
    """Refuse settings the GRPO loop cannot honour, before anything is loaded."""
    grpo = cfg.grpo
    if not grpo.reward_fns:
        raise ConfigError("stage grpo needs grpo.reward_fns: the reward functions that score each completion "
                          "(built-ins accuracy, format, length; or 'path/to/file.py:function'). Example: "
                          "grpo.reward_fns=[accuracy].")
    if getattr(cfg.method, "dropout", 0.0):
        raise ConfigError(f"stage grpo needs method.dropout=0 (it is {cfg.method.dropout}): the policy that samples "
                          "and the policy that is updated must be the same network, or the ratio is wrong.")
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"stage grpo takes one optimizer step per update over all completions of a step; "
                          f"train.grad_accum={cfg.train.grad_accum} has no meaning there. Set train.grad_accum=1 "
                          "(train.batch_size sets the rows of each accumulated micro-batch).")
    rollout_backend(cfg, world_size())  # the launcher's count: this check runs before the process group exists


@dataclass
class Group:
    """One step's completions, scored, with what the updates need ([N, R] unless noted)."""

    rollout: Rollout
    rewards: torch.Tensor  # [N, F]: one column per reward function, NaN = not applicable
    total: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N] completion tokens
    clipped: torch.Tensor  # [N] bool: reached max_new_tokens without a stop token
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None


@contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Inside the block, the output layer reads a contiguous copy of its input.

    ``generate`` feeds the LM head the last position of the prompt, a ``[n, 1, hidden]``
    slice of the prefill's hidden states. On the CPU, ``linear`` on such a strided 3-D
    input broadcasts the weight to one copy per row: for SmolLM2 (a 49152 x 576 head) and 16
    prompts, 870 MB held for that one product, the peak of a whole GRPO step. The copy
    of the slice costs 16 x 576 numbers; decoding steps are already contiguous.
    """
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def completion_ids(rollout: Rollout) -> list[list[int]]:
    """Each row's completion tokens as sampled (a stop token included)."""
    return [row[row != IGNORE_INDEX].tolist() for row in rollout.labels]


class GRPOTrainer(RolloutTrainer):
    """One GRPO-family run: a step samples groups, scores them and updates the policy."""

    @staticmethod
    def check_config(cfg: RunConfig) -> None:
        check_grpo_config(cfg)

    def prompts_per_step(self) -> int:
        return self.cfg.grpo.prompts_per_step

    def updates_per_step(self) -> int:
        return self.cfg.grpo.num_iterations

    def attach(self, model: nn.Module) -> None:
        """Reward functions, the reference (only when beta > 0) and the sampling settings."""
        cfg, grpo = self.cfg, self.cfg.grpo
        self.policy = model
        self.rewards = resolve_rewards(grpo.reward_fns, grpo.reward_weights, grpo.max_new_tokens)
        self.reference = ReferenceModel(self.method, model, cfg.pref.ref_on_cpu) if grpo.beta > 0 else None
        loaded = LoadedRun(model, self.tokenizer, self.data.template, cfg, self.method, str(self.run_dir.root))
        self.stop_ids = stop_token_ids(loaded)
        self.generation = generation_config(grpo, self.stop_ids, self.tokenizer.pad_token_id)
        backend = rollout_backend(cfg, self.accelerator.num_processes)
        self.vllm = VllmSampler(cfg, self.method) if backend == "vllm" else None
        self.clip = clip_range(grpo)
        self.micro = cfg.train.batch_size
        # Optimizer updates so far (AdaLoRA's schedule counts them), from the step on the first update.
        self.updates_done: int | None = None

    # -- sampling and scoring ----------------------------------------------------------------
    def _reward_inputs(self, examples: list[PromptExample], rollout: Rollout) -> tuple[list[Any], list[Any]]:
        """Prompts and completions as the reward functions receive them (``grpo.reward_inputs``)."""
        if self.cfg.grpo.reward_inputs == "text":
            return list(rollout.prompts), list(rollout.responses)
        prompts = [[{"role": m.role, "content": m.content} for m in e.prompt] for e in examples]
        return prompts, [[{"role": "assistant", "content": text}] for text in rollout.responses]

    def _score(self, examples: list[PromptExample], rollout: Rollout, ids: list[list[int]]) -> torch.Tensor:
        prompts, completions = self._reward_inputs(examples, rollout)
        # The record's reference answer, where the data layer keeps it on the prompt example.
        answers = [getattr(e, "answer", None) for e in examples]
        columns = {"solution": answers} if any(a is not None for a in answers) else {}
        return score_rewards(self.rewards, prompts, completions, ids, columns)

    def _row_chunks(self, size: int) -> list[torch.Tensor]:
        return list(torch.arange(size, device=self.device).split(self.micro))

    def _sample(self, examples: list[PromptExample]) -> Rollout:
        """One completion per example, from vLLM or from ``generate`` (``grpo.rollout_backend``)."""
        if self.vllm is not None:
            return self.vllm.sample(self.policy, examples, self.tokenizer, self.generation, self.device)
        with contiguous_head_input(self.policy):
            return sample_rollout(self.policy, examples, self.tokenizer, self.generation, self.device)

    @torch.no_grad()
    def collect(self, indices: list[int]) -> Group:
        """Steps 2-5 of the module docstring."""
        grpo, chunk = self.cfg.grpo, self.cfg.train.loss_chunk_size
        examples = [self.data.train[i] for i in indices for _ in range(grpo.num_generations)]
        self.policy.eval()
        with self.accelerator.autocast():
            rollout = self._sample(examples)
            old, ref = [], []
            for index in self._row_chunks(rollout.size) if grpo.num_iterations > 1 or self.reference else []:
                batch = rollout.rows(index)
                if grpo.num_iterations > 1:
                    old.append(response_outputs(self.policy, batch, grpo.temperature, chunk).logprobs)
                if self.reference is not None:
                    ref.append(self.reference.run(
                        lambda model, b: response_outputs(model, b, grpo.temperature, chunk).logprobs, batch))
        ids = completion_ids(rollout)
        table = self._score(examples, rollout, ids).to(self.device)
        total = total_reward(table, self.rewards)
        advantages = group_advantages(total, grpo.num_generations, grpo.advantage, scales_rewards(grpo))
        stops = set(self.stop_ids)
        clipped = torch.tensor([len(t) >= grpo.max_new_tokens and t[-1] not in stops for t in ids])
        lengths = rollout.mask.sum(dim=1)
        return Group(rollout, table, total, advantages, lengths, clipped, torch.cat(old) if old else None,
                     torch.cat(ref) if ref else None)

    # -- updates -------------------------------------------------------------------------------
    def _update(self, group: Group, first: bool) -> dict[str, float]:
        """One optimizer step on every completion of the group, accumulated over micro-batches."""
        grpo, chunk = self.cfg.grpo, self.cfg.train.loss_chunk_size
        mask = group.rollout.mask
        chunks = self._row_chunks(group.rollout.size)
        scope = StepScope(sequences=group.rollout.size, tokens=int(mask.sum()),
                          max_completion_length=grpo.max_new_tokens, micro_batches=len(chunks))
        sums = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "entropy": 0.0}
        for index in chunks:
            batch = group.rollout.rows(index)
            share = int(mask[index].sum()) / max(scope.tokens, 1)
            with self.accelerator.autocast():
                out = response_outputs(self.model, batch, grpo.temperature, chunk, entropy=first)
                old = group.old_logprobs[index] if group.old_logprobs is not None else out.logprobs.detach()
                ref = group.ref_logprobs[index] if group.ref_logprobs is not None else None
                result = policy_loss(out.logprobs, old, group.advantages[index], mask[index], loss=grpo.loss,
                                     epsilon=self.clip.low, epsilon_high=self.clip.high, ref_logprobs=ref,
                                     beta=grpo.beta, scope=scope)
            self.accelerator.backward(result.loss)
            sums["loss"] += float(result.loss.detach())
            sums["clip_low"] += result.clip_low * share
            sums["clip_high"] += result.clip_high * share
            sums["kl"] += result.kl * share
            sums["entropy"] += out.entropy_sum / max(scope.tokens, 1)
        if self.cfg.train.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                             self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.updates_done += 1
        self.method.on_optimizer_step(self.policy, self.updates_done)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def update(self, group: Group) -> dict[str, float]:
        """``grpo.num_iterations`` updates; the loss and clip fractions averaged over them, the
        entropy of the sampling policy (measured in the first)."""
        if self.updates_done is None:
            self.updates_done = self.state.step * self.updates_per_step()
        self.model.train()  # dropout is 0 (checked); train mode lets gradient checkpointing run
        runs = [self._update(group, first=i == 0) for i in range(self.cfg.grpo.num_iterations)]
        self.model.eval()
        averaged = {key: sum(r[key] for r in runs) / len(runs) for key in ("loss", "clip_low", "clip_high", "kl")}
        return {**averaged, "entropy": runs[0]["entropy"]}

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        """One batch of prompts: sample, score, update (the module docstring)."""
        group = self.collect(self.next_batch())
        stats = self.update(group)
        row = {"loss": stats["loss"], **reward_metrics(group.rewards, self.rewards),
               "equal_reward_groups": equal_reward_groups(group.total, self.cfg.grpo.num_generations),
               "completion_length": float(group.lengths.float().mean()),
               "completion_clipped": float(group.clipped.float().mean()),
               "clip_ratio": stats["clip_low"] + stats["clip_high"], "clip_low": stats["clip_low"],
               "clip_high": stats["clip_high"], "entropy": stats["entropy"]}
        if self.cfg.grpo.beta > 0:
            row["kl"] = stats["kl"]
        return StepOutput(group.rollout.tokens, row)

    def announce(self) -> list[str]:
        grpo = self.cfg.grpo
        names = ", ".join(f"{r.name} x{r.weight:g}" for r in self.rewards)
        return [f"grpo ({grpo.loss} loss, {grpo.advantage} advantage) with method {self.method.name}: "
                f"{self.trainable_params:,} trainable of {self.total_params:,} parameters; {len(self.data.train)} "
                f"prompts; {self.total_steps} steps of {grpo.prompts_per_step} prompts x {grpo.num_generations} "
                f"completions sampled by {'vllm' if self.vllm is not None else 'transformers'}; rewards {names}; "
                f"lr {self.cfg.train.lr:g}"]
