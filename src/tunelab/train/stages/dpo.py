"""Stage ``dpo``: direct preference optimisation and its family (IPO, hinge/SLiC, ORPO, SimPO).

The loss formulas are in :mod:`tunelab.train.losses`; this module runs the policy and the
reference on chosen/rejected pairs (``[chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}]``,
padded or packed alike through ``sequence_index``) and feeds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunelab.data.records import Preference
from tunelab.data.tokenize import encode_preference
from tunelab.errors import ConfigError
from tunelab.models.forward import Batch
from tunelab.train.loop import Trainer
from tunelab.train.losses import dpo_loss, orpo_loss, simpo_loss
from tunelab.train.objectives import Objective, batch_logps, halves, length_mean, pair_metrics
from tunelab.train.reference import ReferenceModel
from tunelab.train.stages.base import StageSpec

if TYPE_CHECKING:
    from tunelab.config import PrefConfig, RunConfig
    from tunelab.methods.base import Method

#: Losses that compare the policy with nothing but itself: no reference pass at all.
REFERENCE_FREE = ("orpo", "simpo")
#: Losses on length-averaged log-probs (see ``losses.sequence_logps``); the others use sums.
LENGTH_AVERAGED = ("ipo", "orpo", "simpo")


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
        policy = length_mean(sums, counts) if self.pref.loss in LENGTH_AVERAGED else sums
        losses, chosen_rewards, rejected_rewards = self._pair_losses(policy, batch)
        total = losses.sum()
        if self.sft_weight:
            chosen_sums, _ = halves(sums)
            chosen_counts, _ = halves(counts)
            total = total - self.sft_weight * length_mean(chosen_sums, chosen_counts).sum()
        return total, pair_metrics(chosen_rewards, rejected_rewards)

    def _pair_losses(self, policy: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pref = self.pref
        chosen, rejected = halves(policy)
        if pref.loss == "orpo":
            return orpo_loss(chosen, rejected, pref.beta)
        if pref.loss == "simpo":
            return simpo_loss(chosen, rejected, pref.beta, pref.simpo_gamma)
        ref_sums, ref_counts = self.reference_logps(batch)
        ref = length_mean(ref_sums, ref_counts) if pref.loss in LENGTH_AVERAGED else ref_sums
        ref_chosen, ref_rejected = halves(ref)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, pref.beta, pref.loss,  # type: ignore[arg-type]
                        pref.label_smoothing)


def preference_objective(cfg: "RunConfig", method: "Method", model: nn.Module, tokenizer: Any) -> Objective:
    """The reference is the method switched off (or a frozen copy); reference-free losses get none."""
    free = cfg.pref.loss in REFERENCE_FREE
    reference = None if free else ReferenceModel(method, model, cfg.pref.ref_on_cpu)
    return PreferenceObjective(cfg.pref, cfg.train.loss_chunk_size, reference)


STAGE = StageSpec(
    name="dpo",
    summary="preference optimisation on chosen/rejected pairs (pref.loss: sigmoid = DPO, ipo, hinge, orpo, simpo)",
    records=(Preference,),
    needs="preference pairs (chosen/rejected)",
    encoder=encode_preference,
    trainer=Trainer,
    objective=preference_objective,
    metrics=("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"),
)
