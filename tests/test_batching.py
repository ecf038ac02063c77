"""Batches: packed and padded rows give exactly the per-example losses; deterministic batch plans."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.batching import (PadWidth, collate, collate_pairs, collate_unpaired, model_inputs,
                                   plan_batches)
from tunelab.data.records import Example, PairExample, UnpairedExample
from tunelab.data.tokenize import IGNORE

PAD = 2


def _example(seed: int, length: int, prompt: int) -> Example:
    ids = torch.randint(3, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Example(ids, [IGNORE] * prompt + ids[prompt:])


EXAMPLES = [_example(1, 13, 5), _example(2, 7, 3), _example(3, 21, 10), _example(4, 2, 1)]


def _token_losses(model, batch) -> torch.Tensor:
    """Per-label losses in batch order (the HF convention: logits at t predict labels at t+1)."""
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="none")
    return losses[labels.flatten() != IGNORE]


def _alone(model, examples) -> torch.Tensor:
    return torch.cat([_token_losses(model, collate([e], PAD, packing=False)) for e in examples])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_row_gives_exactly_the_per_example_losses(model, attention):
    """Proves that packed examples do not attend to each other (and see their own positions)."""
    model.set_attn_implementation(attention)
    packed = _token_losses(model, collate(EXAMPLES, PAD, packing=True))
    torch.testing.assert_close(packed, _alone(model, EXAMPLES), atol=1e-5, rtol=1e-5)


def test_padded_batch_gives_exactly_the_per_example_losses(model):
    padded = _token_losses(model, collate(EXAMPLES, PAD, packing=False))
    torch.testing.assert_close(padded, _alone(model, EXAMPLES), atol=1e-5, rtol=1e-5)


def test_packed_layout(tokenizer):
    batch = collate(EXAMPLES, PAD, packing=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: packing is detected
    total = sum(len(e.input_ids) for e in EXAMPLES)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["input_ids"][0].tolist() == [t for e in EXAMPLES for t in e.input_ids]
    starts, offset = [], 0
    for e in EXAMPLES:
        starts.append(offset)
        assert batch["position_ids"][0, offset:offset + len(e.input_ids)].tolist() == list(range(len(e.input_ids)))
        offset += len(e.input_ids)
    # Fully supervised examples still never predict their first token from the previous example.
    full = [Example(e.input_ids, list(e.input_ids)) for e in EXAMPLES]
    labels = collate(full, PAD, packing=True)["labels"][0]
    assert [labels[s].item() for s in starts] == [IGNORE] * len(EXAMPLES)
    assert (labels != IGNORE).sum().item() == total - len(EXAMPLES)


def test_rounded_width_keeps_the_per_example_losses(model):
    """Extra pads after every real token change nothing: right padding, causal attention, no labels."""
    batch = collate(EXAMPLES, PAD, packing=False, pad_width=PadWidth(16))
    assert batch["input_ids"].shape[1] == 32 and batch["padding_mask"].sum() == sum(len(e.input_ids) for e in EXAMPLES)
    torch.testing.assert_close(_token_losses(model, batch), _alone(model, EXAMPLES), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multiple, limit, longest, width", [
    (64, None, 65, 128), (64, None, 128, 128), (64, 100, 70, 100), (64, 100, 100, 100), (1, None, 37, 37),
])
def test_pad_width_rounds_up_but_never_beyond_max_length(multiple, limit, longest, width):
    assert PadWidth(multiple, limit).of(longest) == width


def test_rounded_pairs_index_every_padded_position():
    pairs = [PairExample(EXAMPLES[0], EXAMPLES[1])]
    batch = collate_pairs(pairs, PAD, False, PadWidth(8))
    assert batch["sequence_index"].shape == batch["input_ids"].shape == (2, 16)
    assert batch["sequence_index"][1].tolist() == [1] * 7 + [-1] * 9


def test_padded_layout():
    batch = collate(EXAMPLES[:2], PAD, packing=False)
    assert batch["input_ids"].tolist()[1] == EXAMPLES[1].input_ids + [PAD] * 6
    assert batch["labels"].tolist()[1] == EXAMPLES[1].labels + [IGNORE] * 6
    assert batch["padding_mask"].tolist()[1] == [1] * 7 + [0] * 6
    assert batch["position_ids"].tolist()[0] == list(range(13))
    # right padding needs no attention mask: the model gets none, so SDPA keeps its causal kernel
    assert "attention_mask" not in model_inputs(batch)


@pytest.mark.parametrize("packing", [True, False])
def test_pair_collation_orders_chosen_then_rejected(packing):
    pairs = [PairExample(EXAMPLES[0], EXAMPLES[1]), PairExample(EXAMPLES[2], EXAMPLES[3])]
    order = [EXAMPLES[0], EXAMPLES[2], EXAMPLES[1], EXAMPLES[3]]
    batch = collate_pairs(pairs, PAD, packing)
    assert batch["num_sequences"].ndim == 0 and batch["num_sequences"].item() == 4
    if packing:
        assert batch["sequence_index"][0].tolist() == [i for i, e in enumerate(order) for _ in e.input_ids]
        assert batch["input_ids"][0].tolist() == [t for e in order for t in e.input_ids]
    else:
        for row, example in enumerate(order):
            n = len(example.input_ids)
            assert batch["input_ids"][row, :n].tolist() == example.input_ids
            assert batch["sequence_index"][row].tolist() == [row] * n + [-1] * (21 - n)


def test_unpaired_collation_carries_desirability():
    items = [UnpairedExample(EXAMPLES[0], True), UnpairedExample(EXAMPLES[1], False)]
    batch = collate_unpaired(items, PAD, packing=True)
    assert batch["desirable"].tolist() == [True, False] and batch["desirable"].dtype == torch.bool
    assert batch["sequence_index"][0].tolist() == [0] * 13 + [1] * 7


LENGTHS = [(i * 37) % 101 + 1 for i in range(1000)]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_plan_batches_covers_every_index_once_and_is_deterministic(group, shuffle):
    plan = plan_batches(LENGTHS, 8, shuffle=shuffle, seed=3, epoch=1, group_by_length=group)
    assert sorted(i for batch in plan for i in batch) == list(range(len(LENGTHS)))
    assert all(len(batch) == 8 for batch in plan)
    assert plan == plan_batches(LENGTHS, 8, shuffle=shuffle, seed=3, epoch=1, group_by_length=group)
    other_epoch = plan_batches(LENGTHS, 8, shuffle=shuffle, seed=3, epoch=2, group_by_length=group)
    assert (plan != other_epoch) == shuffle


def test_plan_batches_keeps_a_short_last_batch():
    plan = plan_batches(list(range(10)), 4, shuffle=True, seed=0, epoch=0, group_by_length=True)
    assert sorted(len(b) for b in plan) == [2, 4, 4]
    assert sorted(i for b in plan for i in b) == list(range(10))


def test_length_grouping_cuts_padding():
    def padding(plan):
        return sum(len(b) * max(LENGTHS[i] for i in b) - sum(LENGTHS[i] for i in b) for b in plan)
    grouped = plan_batches(LENGTHS, 8, shuffle=True, seed=0, epoch=0, group_by_length=True)
    random_ = plan_batches(LENGTHS, 8, shuffle=True, seed=0, epoch=0, group_by_length=False)
    assert padding(grouped) < padding(random_) / 5
