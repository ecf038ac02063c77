"""Batch prediction: generate an answer for every record of a dataset file."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tunelab.data.formats import to_records
from tunelab.data.records import Conversation, Message, Preference, Unpaired
from tunelab.data.sources import DatasetRegistry
from tunelab.errors import DataError
from tunelab.inference import GenerationOptions, LoadedRun, generate, load_run
from tunelab.io import atomic_open


def prompts_and_references(path: str | Path, max_samples: int | None = None,
                           ) -> list[tuple[list[Message], str | None]]:
    """(prompt messages, reference answer or None) for each record of ``path``.

    A conversation's prompt is everything before its last assistant turn, which becomes
    the reference; preference and KTO records give their prompt and the chosen answer.
    """
    spec = DatasetRegistry(Path(path).parent).resolve(str(path))
    records, _ = to_records(spec.rows(), spec, "raise", require_answer=False)
    pairs: list[tuple[list[Message], str | None]] = []
    for record in records[:max_samples]:
        if isinstance(record, Conversation):
            messages = record.messages
            if messages and messages[-1].role == "assistant":
                pairs.append((messages[:-1], messages[-1].content))
            else:
                pairs.append((messages, None))
        elif isinstance(record, Preference):
            pairs.append((record.prompt, record.chosen))
        elif isinstance(record, Unpaired):
            pairs.append((record.prompt, record.completion if record.desirable else None))
        else:
            raise DataError("plain-text records have no prompt to answer; predict needs alpaca, sharegpt or "
                            "OpenAI-messages records.", file=str(path))
    return pairs


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict_records(loaded: LoadedRun, pairs: list[tuple[list[Message], str | None]], options: GenerationOptions,
                    batch_size: int) -> Iterator[dict]:
    for chunk in _batches(pairs, batch_size):
        answers = generate(loaded, [prompt for prompt, _ in chunk], options)
        for (prompt, reference), answer in zip(chunk, answers):
            yield {"prompt": [{"role": m.role, "content": m.content} for m in prompt],
                   "prediction": answer, "reference": reference}


def predict_file(run: str, data: str | Path, out: str | Path, options: GenerationOptions, batch_size: int = 8,
                 max_samples: int | None = None) -> int:
    """Write one JSON line per record to ``out`` (atomically: a crash leaves no partial file)."""
    import json

    pairs = prompts_and_references(data, max_samples)
    loaded = load_run(run)
    count = 0
    with atomic_open(out) as handle:
        for row in predict_records(loaded, pairs, options, batch_size):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
