"""Batch prediction: generate an answer for every record of a dataset file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from tunelab.data.formats import to_records
from tunelab.data.records import Conversation, Message, Preference, Tool, Unpaired
from tunelab.data.sources import DatasetRegistry
from tunelab.errors import DataError
from tunelab.inference import GenerationOptions, LoadedRun, generate, load_run
from tunelab.io import atomic_open
from tunelab.progress import track


class Prompt(NamedTuple):
    """What to ask (``messages``, offered ``tools``) and the answer the record holds, if any."""

    messages: list[Message]
    reference: str | None
    tools: Sequence[Tool] = ()


def prompts_and_references(path: str | Path, max_samples: int | None = None) -> list[Prompt]:
    """One :class:`Prompt` per record of ``path``.

    A conversation's prompt is everything before its last assistant turn, which becomes
    the reference; preference and KTO records give their prompt and the chosen answer.
    Tool definitions the record offered stay with the prompt, so the model is asked with
    the tools it was trained to call.
    """
    spec = DatasetRegistry(Path(path).parent).resolve(str(path))
    records, _ = to_records(spec.rows(), spec, "raise", require_answer=False)
    prompts: list[Prompt] = []
    for record in records[:max_samples]:
        if isinstance(record, Conversation):
            messages = record.messages
            if messages and messages[-1].role == "assistant":
                prompts.append(Prompt(messages[:-1], messages[-1].content, record.tools))
            else:
                prompts.append(Prompt(messages, None, record.tools))
        elif isinstance(record, Preference):
            prompts.append(Prompt(record.prompt, record.chosen, record.tools))
        elif isinstance(record, Unpaired):
            prompts.append(Prompt(record.prompt, record.completion if record.desirable else None, record.tools))
        else:
            raise DataError("plain-text records have no prompt to answer; predict needs alpaca, sharegpt or "
                            "OpenAI-messages records.", file=str(path))
    return prompts


def predict_records(loaded: LoadedRun, prompts: Sequence[tuple], options: GenerationOptions, batch_size: int,
                    progress: str | None = None) -> Iterator[dict]:
    """Answer ``prompts`` (:class:`Prompt`, or ``(messages, reference)`` pairs) ``batch_size`` at a time.

    ``progress``: the label of a progress bar on the terminal (None: no bar).
    """
    items = [Prompt(*item) for item in prompts]
    batches = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    for chunk in track(batches, progress, unit="prompt"):
        answers = generate(loaded, [item.messages for item in chunk], options,
                           tools=[list(item.tools) or None for item in chunk])
        for item, answer in zip(chunk, answers):
            row = {"prompt": [{"role": m.role, "content": m.content} for m in item.messages],
                   "prediction": answer, "reference": item.reference}
            if item.tools:
                row["tools"] = list(item.tools)
            yield row


def predict_file(run: str, data: str | Path, out: str | Path, options: GenerationOptions, batch_size: int = 8,
                 max_samples: int | None = None, progress: bool = False) -> int:
    """Write one JSON line per record to ``out`` (atomically: a crash leaves no partial file).

    ``progress``: show a bar on the terminal while answering.
    """
    prompts = prompts_and_references(data, max_samples)
    loaded = load_run(run)
    count = 0
    with atomic_open(out) as handle:
        for row in predict_records(loaded, prompts, options, batch_size, "predict" if progress else None):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
