"""Tokenized examples -> batches of tensors, and the order in which examples are batched.

Batch contract (dict of torch tensors, read by the training loop and the objectives):

- ``input_ids`` [B, T] long; ``labels`` [B, T] long, aligned with ``input_ids`` (NOT shifted: the
  loss predicts ``labels[:, t]`` from position ``t-1``), -100 = no loss; ``position_ids`` [B, T].
- Packed (``packing=True``, padding-free): B = 1, all examples concatenated, ``position_ids``
  restart at 0 for every example and there is NO ``attention_mask``. transformers then detects
  the packed sequences from the position ids (``masking_utils.find_packed_sequence_indices``)
  and builds a block-diagonal causal mask, so examples never attend to each other; and the label
  of every example's first token is -100, so nothing is predicted across a boundary. The
  detection only runs when the model has no KV cache: call the model with
  :func:`model_inputs`, which passes ``use_cache=False`` (models default to creating a cache
  even in training, and then silently attend across examples).
- Padded (``packing=False``): right padding with ``pad_id``, labels -100 on padding,
  ``position_ids`` counting from 0 in every row, and ``padding_mask`` [B, T] (1 = real token),
  which is NOT passed to the model: with right padding a causal model's real tokens never
  attend to the pads after them, so no attention mask is needed, and without one SDPA runs
  its fused causal kernel (memory linear in length) instead of materialising [T, T] scores.
  A packed row's block-diagonal mask forces that materialised path, quadratic in the row's
  total length: on CPU (and SDPA generally), length-grouped right padding is faster and
  much lighter than one packed row; with flash-attention's varlen kernels packing wins.
- Sequence objectives (rm, dpo, kto) also get ``sequence_index`` [B, T] long: which sequence each
  token (and its label) belongs to, -1 on padding, and ``num_sequences`` (0-d). Pairs are ordered
  ``[chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}]``; unpaired batches add ``desirable`` [N].
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunelab.data.records import IGNORE_INDEX as IGNORE
from tunelab.data.records import Example, PairExample, UnpairedExample

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")
# Length grouping sorts within chunks of this many batches: large enough that similar lengths
# meet, small enough that the order stays random across the epoch.
GROUP_CHUNK_BATCHES = 50

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PadWidth:
    """How wide a padded batch is: its longest row, rounded up to a ``multiple``, never
    beyond ``limit`` (``data.max_length``: positions the model is configured for).

    Why round: on CPU, oneDNN compiles and caches matmul kernels per matrix shape, so
    batches of a few distinct widths reuse compiled kernels where every new width compiles
    and keeps new ones. On the speed job rounding to 64 lowered the peak from 3.78 to
    3.49 GB at the same speed within noise (``benchmarks/speed.py`` variant
    ``tunelab_unrounded``: 396 against 383 tokens/s). GPUs prefer such multiples too.
    The extra pads cost nothing in correctness: they come after every real token (right
    padding, causal attention) and carry no labels.
    """

    multiple: int = 1
    limit: int | None = None

    def of(self, longest: int) -> int:
        width = -(-longest // self.multiple) * self.multiple
        return max(longest, min(width, self.limit)) if self.limit is not None else width


def model_inputs(batch: Batch) -> dict[str, object]:
    """The keyword arguments a causal LM takes for ``batch`` (labels and sequence keys stay out).

    ``use_cache=False`` is required for packed batches: see the module docstring."""
    return {**{key: batch[key] for key in MODEL_KEYS if key in batch}, "use_cache": False}


def _packed(examples: Sequence[Example]) -> Batch:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        ids += example.input_ids
        labels += [IGNORE, *example.labels[1:]] if example.labels else []
        positions += range(len(example.input_ids))
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long)}


def _padded(examples: Sequence[Example], pad_id: int, pad_width: PadWidth) -> Batch:
    rows, width = len(examples), pad_width.of(max((len(e.input_ids) for e in examples), default=0))
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        mask[row, :length] = 1
    positions = torch.arange(width, dtype=torch.long).expand(rows, width).clone()
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "padding_mask": mask}


def collate(examples: Sequence[Example], pad_id: int, packing: bool, pad_width: PadWidth = PadWidth()) -> Batch:
    """One causal-LM batch: packed into a single padding-free row, or right-padded rows."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    return _packed(examples) if packing else _padded(examples, pad_id, pad_width)


def _sequence_index(examples: Sequence[Example], packing: bool, width: int) -> torch.Tensor:
    if packing:
        return torch.tensor([[i for i, e in enumerate(examples) for _ in e.input_ids]], dtype=torch.long)
    index = torch.full((len(examples), width), -1, dtype=torch.long)
    for row, example in enumerate(examples):
        index[row, :len(example.input_ids)] = row
    return index


def _collate_sequences(examples: Sequence[Example], pad_id: int, packing: bool, pad_width: PadWidth) -> Batch:
    batch = collate(examples, pad_id, packing, pad_width)
    batch["sequence_index"] = _sequence_index(examples, packing, batch["input_ids"].shape[1])
    batch["num_sequences"] = torch.tensor(len(examples), dtype=torch.long)
    return batch


def collate_pairs(pairs: Sequence[PairExample], pad_id: int, packing: bool, pad_width: PadWidth = PadWidth()
                  ) -> Batch:
    """rm/dpo: 2N sequences, all chosen first, then all rejected (so ``chosen = x[:N]``)."""
    return _collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, packing, pad_width)


def collate_unpaired(items: Sequence[UnpairedExample], pad_id: int, packing: bool,
                     pad_width: PadWidth = PadWidth()) -> Batch:
    """kto: N sequences plus whether each answer is desirable."""
    batch = _collate_sequences([item.example for item in items], pad_id, packing, pad_width)
    batch["desirable"] = torch.tensor([item.desirable for item in items], dtype=torch.bool)
    return batch


def plan_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int, epoch: int,
                 group_by_length: bool) -> list[list[int]]:
    """The example indices of every batch of one epoch; each index appears exactly once.

    Deterministic in ``(seed, epoch)`` alone, so a resumed run replays the same order and can
    skip the batches it already trained on. With ``group_by_length`` the (shuffled) order is cut
    into chunks of ``GROUP_CHUNK_BATCHES`` batches and sorted by length inside each chunk, so
    examples of similar length share a batch (little padding, evenly sized packed rows); the
    batch order is then shuffled again so long and short batches alternate randomly.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(f"tunelab-batches-{seed}-{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        chunk = GROUP_CHUNK_BATCHES * batch_size
        order = [i for start in range(0, len(order), chunk)
                 for i in sorted(order[start:start + chunk], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def collate_examples(items: Sequence[Example | PairExample | UnpairedExample], pad_id: int, packing: bool,
                     pad_width: PadWidth = PadWidth()) -> Batch:
    """Collate whichever kind of tokenized example a stage produces."""
    if isinstance(items[0], PairExample):
        return collate_pairs(items, pad_id, packing, pad_width)  # type: ignore[arg-type]
    if isinstance(items[0], UnpairedExample):
        return collate_unpaired(items, pad_id, packing, pad_width)  # type: ignore[arg-type]
    return collate(items, pad_id, packing, pad_width)  # type: ignore[arg-type]
