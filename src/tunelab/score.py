"""``tunelab score RUN --data FILE --out scores.jsonl``: a reward model's score of every response.

Responses are rendered and tokenized exactly as the reward model was trained (the run's
template with its default system prompt, and ``data.max_length``), and scored at their last token
by the run's value head. Preference files get both answers scored (and the pairwise
accuracy is reported); conversation files score their final assistant turn; KTO files
score the completion and keep its label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.data.batching import collate
from tunelab.data.formats import to_records
from tunelab.data.records import Conversation, Example, Message, Preference, Unpaired
from tunelab.data.sources import DatasetRegistry
from tunelab.data.tokenize import encode_conversation
from tunelab.errors import ConfigError, DataError
from tunelab.inference import LoadedRun, load_run
from tunelab.io import atomic_open
from tunelab.models.value_head import ValueHead, hidden_size_of, load_value_head, padded_sequence_index, sequence_scores


@dataclass
class ScoreSummary:
    out: Path
    responses: int
    pairs: int
    accuracy: float | None  # fraction of pairs whose chosen answer scores higher; None without pairs


@dataclass
class _Item:
    """One record to score: its prompt, named responses, and fields copied to the output."""

    prompt: list[Message]
    responses: dict[str, str]
    extra: dict[str, Any]


def _item(record: Any, path: Path) -> _Item:
    if isinstance(record, Preference):
        return _Item(record.prompt, {"chosen": record.chosen, "rejected": record.rejected}, {})
    if isinstance(record, Unpaired):
        return _Item(record.prompt, {"response": record.completion}, {"desirable": record.desirable})
    if isinstance(record, Conversation) and record.messages and record.messages[-1].role == "assistant":
        return _Item(record.messages[:-1], {"response": record.messages[-1].content}, {})
    what = "plain text" if not isinstance(record, Conversation) else "a conversation that does not end with an answer"
    raise DataError(f"{record.origin or 'a record'}: {what} has no response to score.", file=str(path),
                    hint="Score preference pairs, conversations ending with an assistant turn, or KTO records.")


def read_items(path: str | Path) -> list[_Item]:
    """The records of a dataset file (any supported format), as prompts with responses."""
    path = Path(path)
    spec = DatasetRegistry(path.parent).resolve(str(path))
    records, _ = to_records(spec.rows(), spec, "raise")
    return [_item(record, path) for record in records]


def _encode(loaded: LoadedRun, prompt: list[Message], response: str) -> Example:
    cfg = loaded.cfg
    conv = Conversation([*prompt, Message("assistant", response)])  # the template adds data.system
    return encode_conversation(conv, loaded.template, loaded.tokenizer, cfg.data.max_length, mask_history=True)


@torch.no_grad()
def score_examples(loaded: LoadedRun, head: ValueHead, examples: list[Example], batch_size: int) -> list[float]:
    """Score each tokenized sequence at its last token (padded batches of ``batch_size``)."""
    device = next(loaded.model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], loaded.tokenizer.pad_token_id, packing=False)
        batch["sequence_index"] = padded_sequence_index(batch["padding_mask"])
        batch["num_sequences"] = torch.tensor(batch["input_ids"].shape[0])
        batch = {k: v.to(device) for k, v in batch.items()}
        scores += sequence_scores(loaded.model, head, batch).tolist()
    return scores


def score_main(run: str | Path, data: str | Path, out: str | Path, batch_size: int = 8) -> ScoreSummary:
    """Write one JSON line per record of ``data`` with the reward model's scores to ``out`` (atomically).

    Preference records: ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}``;
    others: ``{"prompt", "response", "score"}`` (+ ``desirable`` for KTO records).
    """
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}.")
    loaded = load_run(run)
    if loaded.cfg.stage != "rm":
        raise ConfigError(f"{run} is a '{loaded.cfg.stage}' run; `tunelab score` needs a reward model (a run trained "
                          "with stage: rm).")
    head = load_value_head(run, hidden_size_of(loaded.model), next(loaded.model.parameters()).device)
    items = read_items(data)
    jobs = [(i, name, _encode(loaded, item.prompt, text)) for i, item in enumerate(items)
            for name, text in item.responses.items()]
    scores = score_examples(loaded, head, [example for _, _, example in jobs], batch_size)
    by_item: list[dict[str, float]] = [{} for _ in items]
    for (i, name, _), value in zip(jobs, scores):
        by_item[i][name] = value
    pairs = [s for s in by_item if "chosen" in s]
    with atomic_open(out) as handle:
        for item, item_scores in zip(items, by_item):
            row = {"prompt": [{"role": m.role, "content": m.content} for m in item.prompt], **item.responses,
                   **item.extra, **{_score_key(name): value for name, value in item_scores.items()}}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    accuracy = sum(s["chosen"] > s["rejected"] for s in pairs) / len(pairs) if pairs else None
    return ScoreSummary(Path(out), len(jobs), len(pairs), accuracy)


def _score_key(name: str) -> str:
    return "score" if name == "response" else f"{name}_score"
