"""Canonical records -> token ids and labels.

Labels are aligned with ``input_ids`` (not shifted; the loss shifts them like HF does) and are
-100 where no loss is taken. ``labels[0]`` is always -100: no position predicts the first
token, so marking it keeps ``supervised_tokens`` an exact count of predicted tokens.

How a conversation becomes tokens: the template's segments are merged into runs of equal
supervision and each run is tokenized on its own (no special tokens are added: a template
that wants a begin-of-text token writes it). Tokenizing runs separately makes label
boundaries exact, and the prompt run before an answer is exactly the text an inference
prompt renders to, so a training prompt tokenizes as the same ids the model is later
prompted with; the answer run is tokenized from its start, as the model generates it. With
ChatML-like templates every run boundary sits at a special token or a newline, where byte-level
BPE never merges, so the ids also equal tokenizing the whole rendering (tested). Tool use follows
from the same segments: an assistant turn that calls tools is supervised like any answer, and tool
results, like user turns, are not (:mod:`tunelab.data.templates` renders both, natively or in its
fallback format).

Truncation keeps the start and cuts the end; an example that lost supervised tokens is marked
``truncated``, one left with none is dropped, and :class:`TokenizeStats` counts both for the
caller to report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

from tunelab.data.records import IGNORE_INDEX as IGNORE
from tunelab.data.records import (Conversation, Example, Message, PairExample, Preference, PromptExample, Record,
                                  Text, Tool, Unpaired, UnpairedExample)
from tunelab.data.templates import ChatTemplate, Segment
from tunelab.errors import ConfigError, DataError, TunelabError


Encoded = Union[Example, PairExample, UnpairedExample, PromptExample]


@dataclass
class TokenizeStats:
    """What tokenization did to a dataset; ``tokens`` and ``supervised_tokens`` count kept examples."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0


# --------------------------------------------------------------------------- helpers

def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _ids_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text tokenized on its own, in one call (per-call overhead dominates short texts)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _supervised(example: Example) -> int:
    return sum(label != IGNORE for label in example.labels)


def _finish(ids: list[int], labels: list[int], max_length: int) -> Example:
    """Mask the first label, then cut to ``max_length``, marking the cut when it took supervised tokens."""
    if labels:
        labels[0] = IGNORE
    truncated = any(label != IGNORE for label in labels[max_length:])
    return Example(ids[:max_length], labels[:max_length], truncated=truncated)


def _runs(pieces: list[Segment]) -> list[Segment]:
    """Merge neighbouring segments with the same supervision flag."""
    runs: list[Segment] = []
    for text, supervised in pieces:
        if runs and runs[-1][1] == supervised:
            runs[-1] = (runs[-1][0] + text, supervised)
        else:
            runs.append((text, supervised))
    return runs


def _only_last_answer(pieces: list[Segment]) -> list[Segment]:
    """mask_history: supervise only the final answer (each answer is one supervised segment)."""
    last = max((i for i, (_, supervised) in enumerate(pieces) if supervised), default=-1)
    return [(text, supervised and i == last) for i, (text, supervised) in enumerate(pieces)]


@contextmanager
def _at(origin: str) -> Iterator[None]:
    """Prefix errors raised while encoding a record with where the record came from."""
    try:
        yield
    except TunelabError as err:
        if not origin:
            raise
        raise type(err)(f"{origin}: {err}") from None


# --------------------------------------------------------------------------- records

def encode_conversation(conv: Conversation, template: ChatTemplate, tokenizer: Any, max_length: int,
                        train_on_prompt: bool = False, mask_history: bool = False) -> Example:
    """Token ids of a rendered conversation; labels on every answer (only the last with ``mask_history``,
    everything with ``train_on_prompt``). Trailing unsupervised tokens (the separator after the last
    end-of-turn) are dropped: nothing after them is predicted, so they would only cost compute."""
    with _at(conv.origin):
        pieces = template.segments(conv.messages, conv.tools)
    if mask_history:
        pieces = _only_last_answer(pieces)
    runs = _runs(pieces)
    ids: list[int] = []
    labels: list[int] = []
    for run, (_, supervised) in zip(_ids_batch(tokenizer, [text for text, _ in runs]), runs):
        ids += run
        labels += run if supervised or train_on_prompt else [IGNORE] * len(run)
    while labels and labels[-1] == IGNORE:
        ids.pop()
        labels.pop()
    return _finish(ids, labels, max_length)


def _answered(record: Preference | Unpaired, answer: str) -> Conversation:
    return Conversation([*record.prompt, Message("assistant", answer)], record.origin, record.tools)


def encode_preference(pref: Preference, template: ChatTemplate, tokenizer: Any, max_length: int) -> PairExample:
    """Chosen and rejected answers to one prompt; only the answers are supervised.

    Both sequences start with the same prompt ids (the prompt run is tokenized identically), which
    pairwise objectives rely on."""
    def encode(answer: str) -> Example:
        return encode_conversation(_answered(pref, answer), template, tokenizer, max_length, mask_history=True)
    return PairExample(encode(pref.chosen), encode(pref.rejected))


def encode_unpaired(record: Unpaired, template: ChatTemplate, tokenizer: Any, max_length: int) -> UnpairedExample:
    """KTO: one prompt + answer (answer supervised) and whether the answer is desirable."""
    conv = _answered(record, record.completion)
    return UnpairedExample(encode_conversation(conv, template, tokenizer, max_length, mask_history=True),
                           record.desirable)


def encode_prompt(messages: list[Message], template: ChatTemplate, tokenizer: Any,
                  tools: list[Tool] | None = None) -> PromptExample:
    """PPO: the prompt rendered exactly as for inference (ending with the generation prompt)."""
    return PromptExample(_ids(tokenizer, template.render(messages, add_generation_prompt=True, tools=tools)),
                         list(messages))


def encode_texts(texts: Sequence[str], tokenizer: Any, block_size: int, separate_documents: bool) -> list[Example]:
    """Continued pre-training: each document + eos, labels = input_ids, cut into blocks of ``block_size``.

    ``separate_documents=False`` concatenates all documents and cuts the stream into blocks
    (a block may span documents, which then attend to each other, as in GPT-style pre-training).
    ``separate_documents=True`` cuts each document on its own and returns one example per chunk.
    Documents are kept apart this way, with no extra field in :class:`Example`: the batcher
    already isolates examples (packed rows restart position ids per example, so attention never
    crosses them), so "one chunk = one example" gives document boundaries for free and packing
    still fills rows densely. The last block of a stream or document may be shorter. No bos is
    added: several tokenizers (SmolLM2's) use their bos token as a chat marker.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("continued pre-training appends the eos token after every document, but the tokenizer "
                          "defines none; set eos_token in the tokenizer.")
    documents = [ids + [eos] for ids in _ids_batch(tokenizer, list(texts))]
    streams = documents if separate_documents else [[t for doc in documents for t in doc]]
    blocks = [stream[i:i + block_size] for stream in streams for i in range(0, len(stream), block_size)]
    return [_finish(block, list(block), block_size) for block in blocks]


# --------------------------------------------------------------------------- datasets

def _prompt_of(record: Record) -> list[Message]:
    """PPO takes prompts from any chat record: a conversation minus its final answer, or a pair's prompt."""
    if isinstance(record, Conversation):
        messages = record.messages
        return messages[:-1] if messages and messages[-1].role == "assistant" else list(messages)
    return record.prompt  # type: ignore[union-attr]


_STAGE_RECORDS: dict[str, tuple[type, ...]] = {
    "pt": (Text,),
    "sft": (Conversation,),
    "rm": (Preference,),
    "dpo": (Preference,),
    "kto": (Unpaired,),
    "ppo": (Conversation, Preference, Unpaired),
    "grpo": (Conversation, Preference, Unpaired),
}
_STAGE_NEEDS = {
    "pt": "plain-text records (a text column)",
    "sft": "conversations (alpaca/sharegpt/messages data)",
    "rm": "preference pairs (chosen/rejected)",
    "dpo": "preference pairs (chosen/rejected)",
    "kto": "answers labelled desirable or not (a kto_tag/label column)",
    "ppo": "prompts (conversations or preference data)",
    "grpo": "prompts (conversations or preference data), with the reference answer where a reward checks it",
}


def _check_types(records: Sequence[Record], stage: str) -> None:
    allowed = _STAGE_RECORDS[stage]
    for index, record in enumerate(records):
        if not isinstance(record, allowed):
            where = record.origin or f"record {index}"
            raise DataError(f"{where}: stage '{stage}' needs {_STAGE_NEEDS[stage]}, but this record is a "
                            f"{type(record).__name__}.", hint="Use a dataset of the right kind for this stage, "
                            "or change `stage`.")


def _sequences(item: Encoded) -> list[Example]:
    if isinstance(item, PairExample):
        return [item.chosen, item.rejected]
    if isinstance(item, UnpairedExample):
        return [item.example]
    return [item]  # type: ignore[list-item]


def _measure(item: Encoded, max_length: int) -> tuple[int, int, bool] | None:
    """(tokens, supervised tokens, truncated) of an item, or None when it cannot train: a sequence
    without supervised tokens, or a prompt longer than ``max_length``."""
    if isinstance(item, PromptExample):
        length = len(item.prompt_ids)
        return (length, 0, False) if length <= max_length else None
    sequences = _sequences(item)
    counts = [_supervised(s) for s in sequences]
    if min(counts) == 0:
        return None
    return sum(len(s.input_ids) for s in sequences), sum(counts), any(s.truncated for s in sequences)


def _keep_trainable(items: list[Encoded], max_length: int) -> tuple[list[Encoded], TokenizeStats]:
    stats = TokenizeStats()
    kept = []
    for item in items:
        measured = _measure(item, max_length)
        if measured is None:
            stats.dropped += 1
            continue
        kept.append(item)
        tokens, supervised, truncated = measured
        stats.examples += 1
        stats.truncated += truncated
        stats.tokens += tokens
        stats.supervised_tokens += supervised
    return kept, stats


def encode_records(records: Sequence[Record], template: ChatTemplate, tokenizer: Any, stage: str, max_length: int,
                   train_on_prompt: bool = False, mask_history: bool = False,
                   separate_documents: bool = True) -> tuple[list[Encoded], TokenizeStats]:
    """Encode a dataset for ``stage`` (pt, sft, rm, dpo, kto, ppo); drop and count what cannot train.

    Output per stage: pt/sft -> :class:`Example`, rm/dpo -> :class:`PairExample`, kto ->
    :class:`UnpairedExample`, ppo -> :class:`PromptExample` (prompts longer than ``max_length``
    are dropped: cutting them would remove the generation prompt).
    """
    if stage not in _STAGE_NEEDS:
        raise ConfigError(f"stage = {stage!r} is not one of {', '.join(_STAGE_NEEDS)}.")
    _check_types(records, stage)
    if stage == "pt":
        items: list[Encoded] = list(encode_texts([r.text for r in records], tokenizer,  # type: ignore[union-attr]
                                                 max_length, separate_documents))
    else:
        encode = _record_encoder(stage, template, tokenizer, max_length, train_on_prompt, mask_history)
        items = [encode(record) for record in records]
    return _keep_trainable(items, max_length)


def _record_encoder(stage: str, template: ChatTemplate, tokenizer: Any, max_length: int, train_on_prompt: bool,
                    mask_history: bool) -> Callable[[Any], Encoded]:
    if stage == "sft":
        return lambda r: encode_conversation(r, template, tokenizer, max_length, train_on_prompt, mask_history)
    if stage in ("rm", "dpo"):
        return lambda r: encode_preference(r, template, tokenizer, max_length)
    if stage == "kto":
        return lambda r: encode_unpaired(r, template, tokenizer, max_length)
    return lambda r: _encode_prompt_record(r, template, tokenizer)


def _encode_prompt_record(record: Record, template: ChatTemplate, tokenizer: Any) -> PromptExample:
    with _at(record.origin):
        return encode_prompt(_prompt_of(record), template, tokenizer, record.tools)  # type: ignore[union-attr]
