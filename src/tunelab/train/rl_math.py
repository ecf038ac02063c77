"""PPO mathematics for RLHF: masked statistics, KL-shaped rewards, GAE, clipped losses.

Pure torch functions over ``[N, T]`` response tensors (N rollouts, T response tokens,
right-padded; ``mask`` is 1/True on real tokens). The recipe follows Ouyang et al. 2022
(InstructGPT, PPO with a per-token KL penalty to the SFT policy, after Ziegler et al.
2019), Schulman et al. 2017 (PPO) and the implementation details collected by Huang et
al. 2024 ("The N+ Implementation Details of RLHF with PPO"). Every statistic is taken
over masked tokens only: padding must never move a mean, a variance or a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_weights(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of the values "
                         f"{tuple(like.shape)}")
    return mask.to(like.dtype)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over entries where ``mask`` is set (over ``dim``, or all).

    An all-masked slice gives 0 rather than NaN, so an empty rollout cannot poison a
    loss.
    """
    weights = _as_weights(mask, values)
    total = (values * weights).sum() if dim is None else (values * weights).sum(dim)
    count = weights.sum() if dim is None else weights.sum(dim)
    return total / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (Bessel-corrected by default, like ``torch.var``).

    The correction matters for the small per-step batches of RLHF; with a single valid
    entry the variance is 0 instead of a division by zero.
    """
    weights = _as_weights(mask, values)
    centred = (values - masked_mean(values, weights)) * weights
    count = weights.sum()
    if unbiased:
        count = count - 1
    return centred.pow(2).sum() / count.clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
                  ) -> Tensor:
    """Normalise masked entries to unit variance (and zero mean if ``shift_mean``).

    Advantages are whitened fully (Schulman et al. 2017's implementation): the policy
    gradient then has a scale independent of the reward model's. Rewards are whitened
    with ``shift_mean=False`` (Huang et al. 2024): dividing by the spread keeps the
    scale in check while the mean, i.e. whether responses are on the whole good or
    bad, survives. Padding entries come back as 0 so they cannot leak anywhere.
    """
    weights = _as_weights(mask, values)
    mean = masked_mean(values, weights)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, weights) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * weights


def kl_penalised_rewards(score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``-kl_coef * (log pi - log pi_ref)`` with the score at the end.

    Ziegler et al. 2019 / Ouyang et al. 2022 (eq. 2) maximise ``score - kl_coef * KL``;
    spreading the KL over tokens with the per-token sample estimate ``log pi - log
    pi_ref`` gives every token its own credit signal, and the sequence-level score
    lands on the last real response token (where the reward model read the answer).

    ``score`` [N]; the others [N, T]. Returns ``(rewards [N, T], kl [N])`` where ``kl``
    is the summed per-token estimate of each sequence (for logging and adaptive KL
    control). Rows with no valid token get no reward.
    """
    weights = _as_weights(mask, logprobs)
    token_kl = (logprobs - ref_logprobs) * weights
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * weights).argmax(dim=1, keepdim=True)
    has_tokens = weights.amax(dim=1, keepdim=True)
    rewards = -kl_coef * token_kl
    rewards = rewards.scatter_add(1, last, score.to(rewards.dtype).unsqueeze(1) * has_tokens)
    return rewards, token_kl.sum(dim=1)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), masked.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``,
    run backwards over the response. The step after the last real token is terminal:
    its value and advantage count as 0, which is what makes right padding safe (the
    padded values are never read). ``lam`` trades bias (small) for variance (1 = Monte
    Carlo returns). Returns ``(advantages, returns)`` with ``returns = A + V`` as the
    value target; both are 0 on padding and carry no gradient (they are targets).
    """
    weights = _as_weights(mask, values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        valid = weights[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * valid
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t] * valid, advantage
    return advantages, (advantages + values) * weights


def ppo_policy_loss(new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    cliprange: float) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate objective of PPO (Schulman et al. 2017, eq. 7), as a loss.

    ``max(-A ratio, -A clip(ratio, 1-eps, 1+eps))`` per token, averaged over real
    tokens: the pessimistic bound removes the incentive to move the ratio past
    ``1 +- eps`` in the direction the advantage favours, so several epochs on one
    rollout stay near the policy that generated it.

    Returns ``(loss, clipfrac, approx_kl)``; the last two are detached diagnostics:
    the fraction of tokens where the clipped term was active, and the ``k3`` estimate
    ``(ratio - 1) - log ratio`` of KL(old || new) (Schulman 2020, "Approximating KL
    divergence"), unbiased and never negative.
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(new_values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   cliprange_value: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)`` over real tokens.

    ``V_clip = V_old + clip(V - V_old, -eps, eps)``, the value-function counterpart of
    the policy clip used in OpenAI's PPO implementations and kept in RLHF (Huang et
    al. 2024): taking the max means the critic cannot jump far from the values the
    advantages were computed with in one update. The 0.5 makes the gradient
    ``V - R``. Returns ``(loss, value_clipfrac)``, the latter detached.
    """
    clipped_values = old_values + torch.clamp(new_values - old_values, -cliprange_value,
                                              cliprange_value)
    unclipped_error = (new_values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).to(new_values.dtype), mask)
    return loss, clipfrac


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean token entropy ``H = -sum p log p`` over real tokens, in fp32.

    A falling entropy is the first sign of a policy collapsing onto a few answers.
    ``log p`` comes from ``log_softmax`` (no log of a rounded probability), and is
    clamped to the most negative finite float so banned tokens (logit -inf, p = 0)
    add 0 instead of NaN. ``logits`` [N, T, V], ``mask`` [N, T].
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return masked_mean(entropy, mask)
