"""Loss mathematics for the training loop: causal LM, per-sequence log-probs, preferences.

Everything here is a pure torch function of tensors (no models, no configs), so the one
training loop can combine them for every stage and the tests can check each against
numbers worked out by hand.

Memory is the main design force. The LM head turns ``tokens x hidden`` into
``tokens x vocab`` logits; with a 49k vocabulary that tensor (plus its fp32 copy, the
saved log-softmax and its gradient) is usually the largest thing in a fine-tuning step.
The token functions therefore (1) keep only the positions that carry a label before the
head runs, and (2) push those rows through the head a chunk at a time under activation
checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"), so at
most one chunk of logits exists at any moment, in forward or backward. This is the idea
behind "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al. 2024), done
with stock PyTorch instead of a custom kernel.

Label convention: ``labels`` are aligned with ``input_ids`` (NOT shifted); the hidden
state at position ``t`` predicts ``labels[t + 1]``; ``-100`` marks positions without a
target.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tunelab.data.records import IGNORE_INDEX
from tunelab.errors import ConfigError

LMHead = nn.Module | Tensor
"""The output projection: a module (``nn.Linear``, a PEFT-wrapped Linear, ...) called on
the hidden rows, or a bare ``[vocab, hidden]`` weight (e.g. tied embeddings)."""

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


# ------------------------------------------------------------------ token log-probs

def _project(lm_head: LMHead, rows: Tensor) -> Tensor:
    """Logits for ``rows`` [n, H]. Modules are called (so adapters on the head run)."""
    if isinstance(lm_head, Tensor):
        return F.linear(rows, lm_head)
    return lm_head(rows)


def _chunk_target_logps(lm_head: LMHead, rows: Tensor, targets: Tensor,
                        temperature: float = 1.0) -> Tensor:
    """log p(target) for each row, computed in fp32.

    The head runs in the model's dtype (bf16 matmuls are where the speed is); the
    log-softmax runs in fp32 because bf16 keeps about 3 significant digits, too few for
    a log-sum-exp over tens of thousands of logits.
    """
    logits = _project(lm_head, rows).float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def _target_logps(lm_head: LMHead, rows: Tensor, targets: Tensor, chunk_size: int,
                  temperature: float = 1.0) -> Tensor:
    """log p(targets) [n] (fp32) for ``rows`` [n, H], never holding more than one chunk
    of logits.

    Each chunk runs under non-reentrant checkpointing: forward keeps only the chunk's
    inputs, backward recomputes that chunk's logits, takes their gradient and frees them
    before the next chunk. The recompute costs one extra head matmul per chunk (about a
    third of the head's training FLOPs) and buys a peak of ``chunk x vocab`` instead of
    ``n x vocab``. Without grad (reference models, evaluation) nothing is saved anyway,
    so chunks run directly. ``chunk_size <= 0``, or a single chunk, skips checkpointing:
    it would recompute without lowering the peak.
    """
    if chunk_size <= 0 or rows.shape[0] <= chunk_size:
        return _chunk_target_logps(lm_head, rows, targets, temperature)
    use_checkpoint = torch.is_grad_enabled()
    pieces = []
    for row_chunk, target_chunk in zip(rows.split(chunk_size), targets.split(chunk_size)):
        if use_checkpoint:
            # preserve_rng_state (the default) replays e.g. LoRA dropout identically.
            piece = checkpoint(_chunk_target_logps, lm_head, row_chunk, target_chunk,
                               temperature, use_reentrant=False)
        else:
            piece = _chunk_target_logps(lm_head, row_chunk, target_chunk, temperature)
        pieces.append(piece)
    return torch.cat(pieces)


def _check_token_shapes(hidden: Tensor, labels: Tensor) -> None:
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden [B, T, H] and labels [B, T] with matching B and T; got hidden "
            f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}. Pass the last hidden "
            "state (before the LM head) and labels aligned with input_ids (not shifted).")


def _supervised_targets(hidden: Tensor, labels: Tensor, valid: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Shift and keep only supervised positions.

    Returns ``(rows [n, H], targets [n], mask [B, T-1])`` where ``mask[b, t]`` says that
    hidden ``t`` predicts a real label at ``t + 1``. ``valid`` ([B, T-1], optional) is
    and-ed in, e.g. to forbid predictions across packed-sequence boundaries. Gathering
    rows first means masked prompt tokens never reach the LM head at all.
    """
    _check_token_shapes(hidden, labels)
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    if valid is not None:
        mask = mask & valid
    return hidden[:, :-1][mask], shifted[mask], mask


def causal_lm_loss(hidden: Tensor, lm_head: LMHead, labels: Tensor, chunk_size: int
                   ) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy (fp32) and the number of supervised tokens.

    Returns the *sum*, not the mean, because the loop normalises by the token count of
    the whole accumulated batch (across micro-batches and ranks): averaging per
    micro-batch would overweight short micro-batches.

    ``chunk_size`` rows of supervised positions go through the head at a time (see
    :func:`_target_logps`); 0 computes all rows in one go. Packed rows must already have
    ``-100`` on the first label of every sequence (the batcher does this), otherwise the
    previous sequence's last token is trained to predict it.

    Zero supervised tokens gives a 0 loss that is still attached to ``hidden`` and the
    head, so ``backward()`` works unconditionally.
    """
    rows, targets, _ = _supervised_targets(hidden, labels)
    logps = _target_logps(lm_head, rows, targets, chunk_size)
    return -logps.sum(), int(targets.shape[0])


def token_logps(hidden: Tensor, lm_head: LMHead, labels: Tensor, chunk_size: int,
                temperature: float = 1.0) -> Tensor:
    """Per-token log p(labels[t]) as a [B, T] fp32 tensor, 0 where there is no target.

    Aligned with ``labels``: entry ``t`` is predicted from hidden ``t - 1`` (entry 0 is
    always 0). PPO needs per-token log-probs of the response; computing them here reuses
    the masked, chunked head so the ``B x T x vocab`` logits never exist. Pass the
    sampling ``temperature`` of the rollouts: the log-probs must be those of the
    distribution the tokens were drawn from (logits / temperature; Huang et al. 2024),
    or the PPO ratio is off from the first step.
    """
    rows, targets, mask = _supervised_targets(hidden, labels)
    logps = _target_logps(lm_head, rows, targets, chunk_size, temperature)
    shifted = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device)
    shifted = shifted.masked_scatter(mask, logps)
    return F.pad(shifted, (1, 0))


def sequence_logps(hidden: Tensor, lm_head: LMHead, labels: Tensor, sequence_index: Tensor,
                   num_sequences: int, chunk_size: int, average: bool = False
                   ) -> tuple[Tensor, Tensor]:
    """Summed (or mean) label log-prob of each sequence, for padded or packed batches.

    ``sequence_index`` [B, T] names the sequence (0..num_sequences-1) each token belongs
    to, -1 for padding; one row may hold several packed sequences. A target counts for
    sequence ``s`` only when both the predicting token and the target token belong to
    ``s``, so nothing is predicted across a packing boundary even if the first label of
    a sequence is not masked.

    Returns ``(logps [num_sequences] fp32, counts [num_sequences] int64)``. ``average``
    divides by the count: the length normalisation of IPO (Azar et al. 2023), SimPO
    (Meng et al. 2024) and ORPO (Hong et al. 2024), which removes the bias toward
    longer or shorter answers that summed log-probs carry. A sequence without any
    supervised token gets 0 (a log-prob of 0 means probability 1, so callers should
    check ``counts``).
    """
    if sequence_index.shape != labels.shape:
        raise ValueError(f"sequence_index {tuple(sequence_index.shape)} must have the shape "
                         f"of labels {tuple(labels.shape)}")
    target_seq = sequence_index[:, 1:]
    same_sequence = (sequence_index[:, :-1] == target_seq) & (target_seq >= 0)
    rows, targets, mask = _supervised_targets(hidden, labels, same_sequence)
    logps = _target_logps(lm_head, rows, targets, chunk_size)
    seq_ids = target_seq[mask]
    sums = logps.new_zeros(num_sequences).index_add(0, seq_ids, logps)
    counts = torch.bincount(seq_ids, minlength=num_sequences)
    if average:
        sums = sums / counts.clamp(min=1)
    return sums, counts


# ------------------------------------------------------------------ preference losses

def _check_pairs(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError("preference losses need tensors of one shape [N]; got "
                         + ", ".join(str(tuple(t.shape)) for t in tensors))


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float, loss_type: DPOLossType = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-family losses per pair, plus implicit rewards (detached) for logging.

    With the implicit reward ``r = beta * (log pi - log pi_ref)`` and the margin
    ``h = (pc - rc) - (pr - rr)`` of policy-vs-reference log-ratios:

    * ``"sigmoid"`` — DPO, Rafailov et al. 2023, eq. 7: ``-log sigmoid(beta h)``, the
      Bradley-Terry likelihood of the preference under the implicit reward. With
      ``label_smoothing = e`` it is the conservative DPO of Mitchell 2023 ("A note on
      DPO with noisy preferences"): the label is flipped with probability ``e``, so the
      loss is ``-(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)``, which stops the
      margin growing without bound.
    * ``"ipo"`` — IPO, Azar et al. 2023, sec. 5 (sampled IPO):
      ``(h - 1/(2 beta))^2``. Regressing the margin to a finite target keeps the
      policy near the reference even for deterministic preferences, where DPO
      overfits. Pass length-normalised (``average=True``) log-probs: with sums, one
      fixed target would ask long answers for a smaller per-token margin than short.
    * ``"hinge"`` — the calibration loss of SLiC-HF, Zhao et al. 2023, sec. 2, on
      reference-normalised log-probs: ``max(0, 1 - beta h)``, i.e. a margin of
      ``1/beta``; beyond it a pair contributes no gradient.

    Returns ``(losses [N], chosen_rewards [N], rejected_rewards [N])``.
    """
    _check_pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if label_smoothing and loss_type != "sigmoid":
        raise ConfigError(
            f"label smoothing (pref.label_smoothing={label_smoothing}) is defined only for "
            f"the 'sigmoid' DPO loss, not '{loss_type}'. Set it to 0 or use loss 'sigmoid'.")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  - label_smoothing * F.logsigmoid(-beta * margin))
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        raise ConfigError(f"unknown DPO loss type '{loss_type}'. Use one of: sigmoid, ipo, "
                          "hinge (ORPO and SimPO have their own functions).")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def _log_odds(avg_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) for p = exp(avg_logps), stable near p = 0 and p = 1.

    ``log(1 - e^x)`` uses ``log(-expm1(x))`` for x near 0 and ``log1p(-e^x)`` further
    out (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"); x is capped just
    below 0 so a perfectly predicted answer gives a large finite odds, not infinity.
    """
    x = avg_logps.float().clamp(max=-1e-6)
    log1m = torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                        torch.log1p(-torch.exp(x)))
    return x - log1m


def orpo_loss(chosen_logps_avg: Tensor, rejected_logps_avg: Tensor, beta: float
              ) -> tuple[Tensor, Tensor, Tensor]:
    """The odds-ratio term of ORPO (Hong et al. 2024, eq. 6-7), weighted by ``beta``.

    ``beta * -log sigmoid(log odds(y_w) - log odds(y_l))`` with ``odds(y) = P/(1-P)``
    and ``P`` the length-normalised likelihood ``exp(mean log p)``. Reference-free: the
    SFT term on the chosen answer anchors the policy instead, so the caller adds that
    NLL (the paper's ``L_SFT``; ``beta`` is its lambda). Odds rather than probabilities
    because the ratio of odds punishes the rejected answer strongly when it is likely
    but gently once it is unlikely, avoiding the collapse a plain likelihood ratio
    causes.

    Returns ``(losses [N], chosen_rewards, rejected_rewards)`` with rewards
    ``beta * mean log p`` (detached), as logged for reference-free methods.
    """
    _check_pairs(chosen_logps_avg, rejected_logps_avg)
    log_odds_ratio = _log_odds(chosen_logps_avg) - _log_odds(rejected_logps_avg)
    losses = -beta * F.logsigmoid(log_odds_ratio)
    return losses, (beta * chosen_logps_avg).detach(), (beta * rejected_logps_avg).detach()


def simpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, beta: float, gamma: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO, Meng et al. 2024, eq. 6: ``-log sigmoid(beta (c - r) - gamma)``.

    The implicit reward is the *length-averaged* policy log-prob (no reference model),
    which matches how generation ranks answers; ``gamma`` is a target reward margin
    (in reward units, i.e. already multiplied by beta) that the chosen answer must
    clear. Returns ``(losses [N], chosen_rewards, rejected_rewards)``, rewards
    ``beta * avg`` detached.
    """
    _check_pairs(chosen_avg, rejected_avg)
    chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def kto_kl_estimate(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """KTO's estimate of ``KL(pi || pi_ref)``: ``mean(log pi - log pi_ref)``, detached.

    Ethayarajh et al. 2024 (sec. 4) estimate it on *mismatched* pairs: each prompt x_i
    scored with another example's completion y_j (j != i, e.g. the batch rolled by one).
    That is the choice we recommend: it costs one extra forward pass of policy and
    reference, but it measures how far the policy drifted in general rather than on the
    very answers being optimised. Passing the batch's own matched log-probs instead gives
    the cheaper batch-mean estimate, biased upward on desirable-heavy batches (those
    rewards are being pushed up). This is the value to log: a sample estimate, it goes
    negative when the policy lowers unrelated answers, which the clamped reference point
    (:func:`kto_reference_point`) would hide as 0. Under data parallelism, all-reduce the
    mean.
    """
    _check_pairs(policy_logps, ref_logps)
    return (policy_logps - ref_logps).mean().detach()


def kto_reference_point(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, kto_kl_estimate)``, detached.

    z0 is a baseline, not a target: the paper does not backpropagate through it, and the
    clamp at 0 holds because a KL divergence cannot be negative. The clamp is for the loss
    only; log :func:`kto_kl_estimate`.
    """
    return kto_kl_estimate(policy_logps, ref_logps).clamp(min=0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor,
             kl_estimate: Tensor | float, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """KTO, Ethayarajh et al. 2024, sec. 4: ``lambda_y - v(x, y)`` per example.

    With ``r = log pi - log pi_ref`` and the reference point ``z0`` (``kl_estimate``,
    see :func:`kto_reference_point`; detached here too so no gradient flows through
    it): desirable examples lose ``lambda_D (1 - sigmoid(beta (r - z0)))``, undesirable
    ones ``lambda_U (1 - sigmoid(beta (z0 - r)))``. The sigmoid is the prospect-theory
    value function (concave in gains, convex in losses); measuring rewards against z0
    makes the loss ask "better than the policy's typical drift", and per-example labels
    mean no preference pairs are needed. The weights rebalance unequal numbers of
    desirable and undesirable examples (the paper keeps
    ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3]).

    ``desirable`` is a bool [N]. Returns ``(losses [N], rewards [N])`` with rewards
    ``beta * r`` detached.
    """
    _check_pairs(policy_logps, ref_logps, desirable)
    z0 = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    log_ratio = policy_logps - ref_logps
    desirable = desirable.bool()
    sign = torch.where(desirable, 1.0, -1.0).to(log_ratio.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(log_ratio.dtype)
    losses = weight * (1 - torch.sigmoid(beta * sign * (log_ratio - z0)))
    return losses, (beta * log_ratio).detach()


def pairwise_reward_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Reward-model loss per pair: ``-log sigmoid(r_chosen - r_rejected)`` [N].

    The negative log-likelihood of the observed preference under the Bradley-Terry
    model (Bradley & Terry 1952), as used for the reward model in Ouyang et al. 2022,
    eq. 1. Only score differences matter, so the reward scale is free; PPO's reward
    whitening takes care of it later.
    """
    _check_pairs(chosen_scores, rejected_scores)
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())
