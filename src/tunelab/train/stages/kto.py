"""Stage ``kto``: Kahneman-Tversky optimisation on answers labelled desirable or not (no pairs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunelab.data.batching import collate_unpaired
from tunelab.data.records import IGNORE_INDEX, Example, Unpaired, UnpairedExample
from tunelab.data.tokenize import encode_unpaired
from tunelab.models.forward import Batch
from tunelab.train.loop import Trainer
from tunelab.train.losses import kto_kl_estimate, kto_loss, kto_reference_point
from tunelab.train.objectives import Objective, batch_logps
from tunelab.train.reference import ReferenceModel
from tunelab.train.stages.base import StageSpec

if TYPE_CHECKING:
    from tunelab.config import PrefConfig, RunConfig
    from tunelab.methods.base import Method


def _answer_start(labels: torch.Tensor) -> int:
    """Index of the first supervised label: where the answer starts."""
    supervised = (labels != IGNORE_INDEX).nonzero()
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
        labels = [IGNORE_INDEX] * len(prompt) + answer_labels
        examples.append(Example((prompt + answer)[:max_length], labels[:max_length]))
    return examples


class KTOObjective(Objective):
    """KTO on unpaired answers labelled desirable or not (units: examples).

    Per micro-batch: policy and reference log-probs of the batch, plus both on the
    mismatched batch (:func:`mismatched_examples`, no gradient) for the reference point
    ``z0``. A batch of one example is its own mismatch, so z0 falls back to the batch
    estimate there. Metrics (averaged over examples by the loop): ``kl`` (the KL estimate
    before z0's clamp at 0, so drift in either direction shows),
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

    def reference_point(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL estimate, z0): mean(log pi - log pi_ref) over the mismatched batch, and its clamp at 0."""
        items = [UnpairedExample(e, True) for e in mismatched_examples(batch, self.max_length)]
        packed = "padding_mask" not in batch
        device = batch["input_ids"].device
        mismatched = {k: v.to(device) for k, v in collate_unpaired(items, self.pad_id, packed).items()}
        with torch.no_grad():
            policy = self._logps(model, mismatched)
        ref = self.reference.run(self._logps, mismatched)
        return kto_kl_estimate(policy, ref), kto_reference_point(policy, ref)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        policy = self._logps(model, batch)
        ref = self.reference.run(self._logps, batch)
        kl, z0 = self.reference_point(model, batch)
        desirable = batch["desirable"].bool()
        pref = self.pref
        losses, rewards = kto_loss(policy, ref, desirable, z0, pref.beta, pref.desirable_weight,
                                   pref.undesirable_weight)
        sign = torch.where(desirable, 1.0, -1.0)
        n = policy.shape[0]
        metrics = {"kl": kl * n, "rewards/signed": (sign * rewards).sum(),
                   "rewards/accuracy": (sign * (rewards - pref.beta * z0) > 0).sum().float()}
        return losses.sum(), metrics


def kto_objective(cfg: "RunConfig", method: "Method", model: nn.Module, tokenizer: Any) -> Objective:
    return KTOObjective(cfg.pref, cfg.train.loss_chunk_size, ReferenceModel(method, model, cfg.pref.ref_on_cpu),
                        tokenizer.pad_token_id, cfg.data.max_length)


STAGE = StageSpec(
    name="kto",
    summary="KTO: push desirable answers up and undesirable ones down against the policy's typical drift",
    records=(Unpaired,),
    needs="answers labelled desirable or not (a kto_tag/label column)",
    encoder=encode_unpaired,
    trainer=Trainer,
    objective=kto_objective,
    metrics=("loss", "kl", "rewards/signed", "rewards/accuracy"),
)
