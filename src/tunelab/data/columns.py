"""Tokenized examples <-> Arrow columns: the layout of the tokenized cache.

One layout per kind of example a stage trains on, so that a cached row turns back into the
very object :mod:`tunelab.data.tokenize` produced (the trainers cannot tell the difference):

* ``sequence`` (pt, sft): ``input_ids``, ``labels`` (list<int32>), ``truncated`` -> :class:`Example`
* ``pair`` (rm, dpo): the same three columns prefixed ``chosen_`` and ``rejected_`` -> :class:`PairExample`
* ``unpaired`` (kto): ``sequence`` + ``desirable`` -> :class:`UnpairedExample`
* ``prompt`` (ppo, grpo): ``prompt_ids`` + ``prompt`` (the messages as JSON) -> :class:`PromptExample`
* ``document`` (pt, before packing): ``input_ids`` of one document followed by eos.

Every layout also has ``length`` (:func:`example_length`), which batching reads without
touching the token columns. int32 ids halve the cache against Arrow's default int64.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import pyarrow as pa

from tunelab.data.records import Example, Message, PairExample, PromptExample, UnpairedExample

Kind = Literal["sequence", "pair", "unpaired", "prompt", "document"]
Encoded = Union[Example, PairExample, UnpairedExample, PromptExample]

KIND_OF_STAGE: dict[str, Kind] = {"pt": "sequence", "sft": "sequence", "rm": "pair", "dpo": "pair",
                                  "kto": "unpaired", "ppo": "prompt", "grpo": "prompt"}
_IDS = pa.list_(pa.int32())
_SEQUENCE = {"input_ids": _IDS, "labels": _IDS, "truncated": pa.bool_()}
PAYLOAD: dict[Kind, dict[str, pa.DataType]] = {
    "sequence": _SEQUENCE,
    "pair": {f"{side}_{name}": kind for side in ("chosen", "rejected") for name, kind in _SEQUENCE.items()},
    "unpaired": {**_SEQUENCE, "desirable": pa.bool_()},
    "prompt": {"prompt_ids": _IDS, "prompt": pa.string()},
    "document": {"input_ids": _IDS},
}


def schema(kind: Kind) -> pa.Schema:
    """Arrow schema of a cached table of ``kind`` (payload + ``length``)."""
    return pa.schema([*PAYLOAD[kind].items(), ("length", pa.int32())])


def example_length(example: Encoded) -> int:
    """Tokens the example puts through the model (both sides of a pair)."""
    if isinstance(example, PairExample):
        return len(example.chosen.input_ids) + len(example.rejected.input_ids)
    if isinstance(example, UnpairedExample):
        return len(example.example.input_ids)
    if isinstance(example, PromptExample):
        return len(example.prompt_ids)
    return len(example.input_ids)


def example_lengths(examples: Sequence[Encoded]) -> Sequence[int]:
    """:func:`example_length` of every example: a cached view's ``lengths`` column as it is (read once
    when the file was opened), else measured one by one (lists of examples, in tests and small paths).
    Why: measuring a 1M-example view example by example reads every token of it (28 s)."""
    lengths = getattr(examples, "lengths", None)
    return lengths if lengths is not None else [example_length(e) for e in examples]


def _sequence(example: Example, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}input_ids": example.input_ids, f"{prefix}labels": example.labels,
            f"{prefix}truncated": example.truncated}


def to_row(kind: Kind, item: Encoded) -> dict[str, Any]:
    """The payload columns of one example."""
    if kind == "pair":
        assert isinstance(item, PairExample)
        return {**_sequence(item.chosen, "chosen_"), **_sequence(item.rejected, "rejected_")}
    if kind == "unpaired":
        assert isinstance(item, UnpairedExample)
        return {**_sequence(item.example), "desirable": item.desirable}
    if kind == "prompt":
        assert isinstance(item, PromptExample)
        return {"prompt_ids": item.prompt_ids, "prompt": json.dumps([dataclasses.asdict(m) for m in item.prompt],
                                                                    ensure_ascii=False)}
    assert isinstance(item, Example)
    return {"input_ids": item.input_ids} if kind == "document" else _sequence(item)


def from_row(kind: Kind, get: Callable[[str], Any]) -> Encoded:
    """The example whose payload columns ``get(name)`` returns (lists of ids as Python lists)."""
    def sequence(prefix: str = "") -> Example:
        return Example(get(f"{prefix}input_ids"), get(f"{prefix}labels"), bool(get(f"{prefix}truncated")))

    if kind == "pair":
        return PairExample(sequence("chosen_"), sequence("rejected_"))
    if kind == "unpaired":
        return UnpairedExample(sequence(), bool(get("desirable")))
    if kind == "prompt":
        return PromptExample(get("prompt_ids"), [from_plain(Message, m) for m in json.loads(get("prompt"))])
    return sequence()


def from_plain(cls: type, data: Any) -> Any:
    """Rebuild a (possibly nested) dataclass from ``dataclasses.asdict`` output, by its type hints, so
    fields added to the record types later still round-trip through the cache."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _plain_value(hints[f.name], data[f.name])
                  for f in dataclasses.fields(cls) if f.name in data})


def _plain_value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return from_plain(hint, value)  # type: ignore[arg-type]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and args:
        items = [_plain_value(args[0], item) for item in value]
        return items if origin is list else tuple(items)
    if origin in (Union, types.UnionType):
        classes = [arg for arg in args if dataclasses.is_dataclass(arg)]
        if isinstance(value, dict) and len(classes) == 1:
            return from_plain(classes[0], value)
        lists = [arg for arg in args if typing.get_origin(arg) is list]
        if isinstance(value, list) and len(lists) == 1:
            return _plain_value(lists[0], value)
    return value
