"""Objectives of the sequence-level stages: reward modelling (rm), DPO family (dpo), KTO (kto).

They read the batch contract of :mod:`tunelab.data.batching`: ``sequence_index`` says
which sequence each token belongs to (so padded and packed batches are handled alike),
pairs come as ``[chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}]`` and unpaired
batches carry ``desirable``. The loss formulas live in :mod:`tunelab.train.losses`; this
module only runs the models and feeds them. Every objective returns its loss summed over
its units (pairs for rm/dpo, examples for kto) and metrics summed the same way, so the
loop's average over an optimizer step is exact however the step is cut into micro-batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunelab.data.batching import collate_unpaired
from tunelab.data.records import Example, UnpairedExample
from tunelab.errors import ConfigError
from tunelab.train.losses import (dpo_loss, kto_loss, kto_reference_point, orpo_loss, pairwise_reward_loss,
                                  sequence_logps, simpo_loss)
from tunelab.train.objectives import Batch, Objective, hidden_states
from tunelab.train.reference import ReferenceModel
from tunelab.train.value_head import ValueHead, attach_value_head, save_value_head, sequence_scores

if TYPE_CHECKING:
    from tunelab.config import PrefConfig, RunConfig
    from tunelab.methods.base import Method

IGNORE = -100
#: Losses that compare the policy with nothing but itself: no reference pass at all.
REFERENCE_FREE = ("orpo", "simpo")
#: Losses on length-averaged log-probs (see ``losses.sequence_logps``); the others use sums.
LENGTH_AVERAGED = ("ipo", "orpo", "simpo")


def batch_logps(model: nn.Module, batch: Batch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed label log-prob [S] fp32, supervised token count [S]) of every sequence in ``batch``."""
    hidden, head = hidden_states(model, batch)
    return sequence_logps(hidden, head, batch["labels"], batch["sequence_index"], int(batch["num_sequences"]),
                          chunk_size)


def _mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return sums / counts.clamp(min=1)


def _halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = values.shape[0] // 2
    return values[:n], values[n:]


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs (the loop divides by the pair count)."""
    return {"rewards/chosen": chosen_rewards.sum().detach(),
            "rewards/rejected": rejected_rewards.sum().detach(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum().detach(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).sum().float()}


# ------------------------------------------------------------------------------ rm

class RewardModelObjective(Objective):
    """Bradley-Terry reward model: a scalar head on the last token of each answer.

    Units are pairs. Metrics: ``accuracy`` (chosen scored strictly higher) and the mean
    chosen/rejected scores and margin.
    """

    def __init__(self, head: ValueHead):
        self.head = head

    def count(self, batch: Batch) -> int:
        return int(batch["num_sequences"]) // 2

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        chosen, rejected = _halves(sequence_scores(model, self.head, batch))
        losses = pairwise_reward_loss(chosen, rejected)
        metrics = _pair_metrics(chosen, rejected)
        metrics["accuracy"] = metrics.pop("rewards/accuracy")
        return losses.sum(), metrics

    def save(self, model: nn.Module, run_dir: Path) -> None:
        save_value_head(self.head, run_dir)


# ------------------------------------------------------------------------------ dpo

class PreferenceObjective(Objective):
    """DPO (``pref.loss: sigmoid``), IPO, hinge (SLiC), ORPO and SimPO on chosen/rejected pairs.

    The reference log-probs come from :class:`ReferenceModel` under ``no_grad``: the same
    module with its adapter off for adapter methods (no second copy in memory), a frozen
    copy for full/freeze. ORPO and SimPO are reference-free and skip that pass entirely.
    ``pref.ftx`` adds ``ftx x`` the per-token NLL of each chosen answer (an SFT term that
    keeps the policy's likelihood of good answers from falling while margins grow); ORPO
    already contains that term with weight 1 (Hong et al. 2024), so for ORPO the weight is
    ``1 + ftx``. Units are pairs.
    """

    def __init__(self, pref: "PrefConfig", chunk_size: int, reference: ReferenceModel | None):
        if pref.label_smoothing and pref.loss != "sigmoid":
            raise ConfigError(f"pref.label_smoothing={pref.label_smoothing} is defined only for pref.loss 'sigmoid' "
                              f"(conservative DPO), not '{pref.loss}'. Set pref.label_smoothing=0 or "
                              "pref.loss=sigmoid.")
        if (reference is None) != (pref.loss in REFERENCE_FREE):
            raise ValueError("a reference model is needed exactly for the reference-based losses")
        self.pref, self.chunk_size, self.reference = pref, chunk_size, reference
        self.sft_weight = pref.ftx + (1.0 if pref.loss == "orpo" else 0.0)

    def count(self, batch: Batch) -> int:
        return int(batch["num_sequences"]) // 2

    def reference_logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-prob, token count) of every sequence under the reference policy."""
        assert self.reference is not None
        return self.reference.run(lambda ref, b: batch_logps(ref, b, self.chunk_size), batch)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        sums, counts = batch_logps(model, batch, self.chunk_size)
        policy = _mean(sums, counts) if self.pref.loss in LENGTH_AVERAGED else sums
        losses, chosen_rewards, rejected_rewards = self._pair_losses(policy, batch)
        total = losses.sum()
        if self.sft_weight:
            chosen_sums, _ = _halves(sums)
            chosen_counts, _ = _halves(counts)
            total = total - self.sft_weight * _mean(chosen_sums, chosen_counts).sum()
        return total, _pair_metrics(chosen_rewards, rejected_rewards)

    def _pair_losses(self, policy: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pref = self.pref
        chosen, rejected = _halves(policy)
        if pref.loss == "orpo":
            return orpo_loss(chosen, rejected, pref.beta)
        if pref.loss == "simpo":
            return simpo_loss(chosen, rejected, pref.beta, pref.simpo_gamma)
        ref_sums, ref_counts = self.reference_logps(batch)
        ref = _mean(ref_sums, ref_counts) if pref.loss in LENGTH_AVERAGED else ref_sums
        ref_chosen, ref_rejected = _halves(ref)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, pref.beta, pref.loss,  # type: ignore[arg-type]
                        pref.label_smoothing)


# ------------------------------------------------------------------------------ kto

def _answer_start(labels: torch.Tensor) -> int:
    """Index of the first supervised label: where the answer starts."""
    supervised = (labels != IGNORE).nonzero()
    return int(supervised[0]) if len(supervised) else len(labels)


def mismatched_examples(batch: Batch, max_length: int) -> list[Example]:
    """Each prompt x_i followed by the next example's answer y_{(i+1) mod N}.

    KTO's reference point estimates KL(pi || pi_ref) on such mismatched pairs (Ethayarajh
    et al. 2024, sec. 4; see ``losses.kto_reference_point``): it measures how far the policy
    drifted in general, not on the answers being pushed up or down. Sequences are read back
    from the batch through ``sequence_index``, so padded and packed batches both work.
    """
    index = batch["sequence_index"]
    sequences = []
    for s in range(int(batch["num_sequences"])):
        where = index == s
        ids, labels = batch["input_ids"][where], batch["labels"][where]
        start = _answer_start(labels)
        sequences.append((ids[:start].tolist(), ids[start:].tolist(), labels[start:].tolist()))
    examples = []
    for i, (prompt, _, _) in enumerate(sequences):
        _, answer, answer_labels = sequences[(i + 1) % len(sequences)]
        examples.append(Example((prompt + answer)[:max_length], ([IGNORE] * len(prompt) + answer_labels)[:max_length]))
    return examples


class KTOObjective(Objective):
    """KTO on unpaired answers labelled desirable or not (units: examples).

    Per micro-batch: policy and reference log-probs of the batch, plus both on the
    mismatched batch (:func:`mismatched_examples`, no gradient) for the reference point
    ``z0``. A batch of one example is its own mismatch, so z0 falls back to the batch
    estimate there. Metrics (averaged over examples by the loop): ``kl`` (z0),
    ``rewards/signed`` (the implicit reward ``beta (log pi - log pi_ref)`` with the sign of
    the label: it rises when desirable answers gain and undesirable ones lose) and
    ``rewards/accuracy`` (examples on the right side of z0).
    """

    def __init__(self, pref: "PrefConfig", chunk_size: int, reference: ReferenceModel, pad_id: int,
                 max_length: int):
        self.pref, self.chunk_size, self.reference = pref, chunk_size, reference
        self.pad_id, self.max_length = pad_id, max_length

    def count(self, batch: Batch) -> int:
        return int(batch["num_sequences"])

    def _logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return batch_logps(model, batch, self.chunk_size)[0]

    def reference_point(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """z0 = max(0, mean(log pi - log pi_ref)) over the mismatched batch, detached."""
        items = [UnpairedExample(e, True) for e in mismatched_examples(batch, self.max_length)]
        packed = "padding_mask" not in batch
        device = batch["input_ids"].device
        mismatched = {k: v.to(device) for k, v in collate_unpaired(items, self.pad_id, packed).items()}
        with torch.no_grad():
            policy = self._logps(model, mismatched)
        return kto_reference_point(policy, self.reference.run(self._logps, mismatched))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        policy = self._logps(model, batch)
        ref = self.reference.run(self._logps, batch)
        z0 = self.reference_point(model, batch)
        desirable = batch["desirable"].bool()
        pref = self.pref
        losses, rewards = kto_loss(policy, ref, desirable, z0, pref.beta, pref.desirable_weight,
                                   pref.undesirable_weight)
        sign = torch.where(desirable, 1.0, -1.0)
        n = policy.shape[0]
        metrics = {"kl": z0 * n, "rewards/signed": (sign * rewards).sum(),
                   "rewards/accuracy": (sign * (rewards - pref.beta * z0) > 0).sum().float()}
        return losses.sum(), metrics


# ------------------------------------------------------------------------------ factory

def build_sequence_objective(cfg: "RunConfig", method: "Method", model: nn.Module, tokenizer: Any) -> Objective:
    """The objective of stage rm, dpo or kto; rm attaches its value head to ``model`` here,
    before the optimizer is built, so the head trains and is checkpointed with the method."""
    chunk = cfg.train.loss_chunk_size
    if cfg.stage == "rm":
        return RewardModelObjective(attach_value_head(model))
    if cfg.stage == "dpo":
        free = cfg.pref.loss in REFERENCE_FREE
        reference = None if free else ReferenceModel(method, model, cfg.pref.ref_on_cpu)
        return PreferenceObjective(cfg.pref, chunk, reference)
    if cfg.stage == "kto":
        return KTOObjective(cfg.pref, chunk, ReferenceModel(method, model, cfg.pref.ref_on_cpu),
                            tokenizer.pad_token_id, cfg.data.max_length)
    raise ConfigError(f"stage '{cfg.stage}' has no sequence-level objective.")
