"""Group-relative policy optimisation: advantages from groups of samples, and the loss family.

Pure torch functions. A generation batch holds ``P`` prompts x ``G`` completions, laid out
group by group (rows ``g*G .. g*G+G-1`` answer prompt ``g``). Token tensors are ``[N, T]``
(N = P x G completions, T completion tokens, right-padded; ``mask`` is True on real tokens);
rewards and advantages are ``[N]``, one per completion, as in outcome supervision.

There is no critic: the baseline of a completion is the reward of its siblings.

* ``group`` (GRPO; Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, section 4.1.2):
  ``A_i = (r_i - mean(r)) / std(r)`` over the group. Dr. GRPO (Liu et al. 2025, arXiv
  2503.20783) drops the division (``scale=False``): dividing by a small std gives
  questions that are nearly always right or nearly always wrong the largest weight.
* ``rloo`` (Ahmadian et al. 2024, arXiv 2402.14740, after Kool et al. 2019): the baseline
  of sample i is the mean of the *other* G-1 rewards, ``A_i = r_i - sum_{j!=i} r_j/(G-1)
  = G/(G-1) (r_i - mean(r))``: unbiased, because the baseline never sees r_i.

The losses share one per-token clipped surrogate (Schulman et al. 2017)
``l_t = -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A)``, ``rho_t = pi/pi_old``, plus
``beta`` times the k3 estimate of KL(pi || pi_ref) (DeepSeekMath eq. 4); they differ in
how token terms become one number (:data:`LossKind`):

* ``grpo`` (DeepSeekMath eq. 3): mean over each completion's tokens, then over completions;
  every completion weighs the same, so a token of a long answer weighs less.
* ``dapo`` (Yu et al. 2025, DAPO, arXiv 2503.14476, eq. 8): sum over all tokens of the
  batch divided by their count; every token weighs the same. DAPO's "clip-higher"
  (``eps_high > eps_low``, 0.28 vs 0.2) is ``epsilon_high`` and applies to every loss.
* ``bnpo``: the ``dapo`` sum normalised by the tokens of each micro-batch (averaged over
  micro-batches) instead of the whole optimizer step; equal to ``dapo`` without
  accumulation.
* ``dr_grpo`` (Dr. GRPO, section 3.1): the token sum divided by a constant, completions x
  the maximum completion length, so neither the answer length nor the group's reward
  spread rescales the gradient.
* ``gspo`` (Zheng et al. 2025, GSPO, arXiv 2507.18071, eqs. 5-7): one importance ratio per
  completion, the geometric mean of its token ratios ``s_i = exp(mean_t log rho_t)``,
  clipped at sequence level (the paper's clip range is ~3e-4 / 4e-4, not 0.2).

With micro-batches, :class:`StepScope` carries the sizes of the whole optimizer step, so
the micro-batch losses add up to exactly the loss of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tunelab.train.rl_math import masked_mean

AdvantageKind = Literal["group", "rloo"]
LossKind = Literal["grpo", "dapo", "bnpo", "dr_grpo", "gspo"]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be a flat vector of whole groups of {group_size}")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, kind: AdvantageKind = "group", scale: bool = True,
                     eps: float = 1e-4) -> Tensor:
    """One advantage per completion from the rewards ``[N]`` of groups of ``group_size``.

    ``scale`` divides by the group's standard deviation (Bessel-corrected, as the sample
    estimate it is) plus ``eps``; a group whose rewards are all equal gets advantage 0
    everywhere, so it teaches nothing rather than something random.
    """
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if kind == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least two completions per prompt (a leave-one-out baseline)")
        centred = centred * (group_size / (group_size - 1))
    elif kind != "group":
        raise ValueError(f"unknown advantage kind {kind!r}; expected 'group' or 'rloo'")
    if scale and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def equal_reward_groups(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal: they have zero advantage and no gradient.

    DAPO's dynamic sampling exists because this fraction grows as training succeeds.
    """
    groups = _grouped(rewards, group_size)
    return float((groups == groups[:, :1]).all(dim=1).float().mean())


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(d) - d - 1`` with ``d = log pi_ref - log pi``.

    Unbiased for samples from pi and never negative (Schulman 2020, "Approximating KL
    divergence"); DeepSeekMath eq. 4.
    """
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


@dataclass(frozen=True)
class StepScope:
    """Sizes of one optimizer step, which may be split into micro-batches.

    ``sequences`` and ``tokens`` count completions and real completion tokens of the whole
    step; ``micro_batches`` how many pieces it is cut into (``bnpo``);
    ``max_completion_length`` the constant of ``dr_grpo`` (the generation limit).
    """

    sequences: int
    tokens: int
    max_completion_length: int
    micro_batches: int = 1

    @classmethod
    def of(cls, mask: Tensor, max_completion_length: int | None = None) -> "StepScope":
        """The scope of a batch that is the whole step."""
        return cls(int(mask.shape[0]), int(mask.sum()), max_completion_length or int(mask.shape[1]))


@dataclass
class PolicyLoss:
    """The loss of one (micro-)batch and detached diagnostics over its real tokens.

    ``clip_low`` / ``clip_high``: fraction of tokens (of completions, for ``gspo``) whose
    ratio sits beyond ``1 - eps_low`` with a negative advantage / beyond ``1 + eps_high``
    with a positive one, where the clipped term is active and passes no gradient. ``kl``:
    mean per-token k3 KL to the reference (0 without one).
    """

    loss: Tensor
    clip_low: float
    clip_high: float
    kl: float

    @property
    def clip_ratio(self) -> float:
        return self.clip_low + self.clip_high


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``-min(rho A, clip(rho) A)`` elementwise, and where the low / high clip is active."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (advantages < 0)
        high = (ratio > 1.0 + eps_high) & (advantages > 0)
    return -torch.minimum(unclipped, clipped), low, high


def _aggregate(token_loss: Tensor, mask: Tensor, loss: LossKind, scope: StepScope) -> Tensor:
    weights = mask.to(token_loss.dtype)
    summed = token_loss * weights
    if loss == "grpo":
        return (summed.sum(dim=1) / weights.sum(dim=1).clamp(min=1)).sum() / scope.sequences
    if loss == "dapo":
        return summed.sum() / max(scope.tokens, 1)
    if loss == "bnpo":
        return summed.sum() / weights.sum().clamp(min=1) / scope.micro_batches
    if loss == "dr_grpo":
        return summed.sum() / (scope.sequences * scope.max_completion_length)
    raise ValueError(f"unknown loss {loss!r}; expected one of grpo, dapo, bnpo, dr_grpo, gspo")


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, loss: LossKind,
                epsilon: float, epsilon_high: float | None = None, ref_logprobs: Tensor | None = None,
                beta: float = 0.0, scope: StepScope | None = None) -> PolicyLoss:
    """The GRPO-family loss (see the module docstring) of completions ``[N, T]``.

    ``old_logprobs`` are the sampling policy's (detached); with one update per generation
    batch they equal ``logprobs.detach()`` and every ratio is 1 with gradient ``A grad log
    pi``. ``advantages`` [N] are per completion. ``ref_logprobs`` are needed only when
    ``beta > 0``. ``scope`` defaults to this batch being the whole step.
    """
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs the reference log-probs")
    scope = scope or StepScope.of(mask)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    weights = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * weights
    kl_tokens = k3_kl(logprobs, ref_logprobs) * weights if beta > 0 else torch.zeros_like(logprobs)
    if loss == "gspo":
        lengths = weights.sum(dim=1).clamp(min=1)
        ratio = torch.exp(log_ratio.sum(dim=1) / lengths)
        surrogate, low, high = _clipped_surrogate(ratio, advantages, epsilon, eps_high)
        per_sequence = surrogate + beta * kl_tokens.sum(dim=1) / lengths
        total = per_sequence.sum() / scope.sequences
        has_tokens = weights.amax(dim=1)
        clip_low, clip_high = masked_mean(low.float(), has_tokens), masked_mean(high.float(), has_tokens)
    else:
        surrogate, low, high = _clipped_surrogate(torch.exp(log_ratio), advantages.unsqueeze(1), epsilon, eps_high)
        total = _aggregate(surrogate + beta * kl_tokens, mask, loss, scope)
        clip_low, clip_high = masked_mean(low.float(), mask), masked_mean(high.float(), mask)
    kl = float(masked_mean(kl_tokens.detach(), mask)) if beta > 0 else 0.0
    return PolicyLoss(total, float(clip_low), float(clip_high), kl)
