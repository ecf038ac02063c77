"""The key of a tokenized cache: everything that can change what the cache holds, and nothing else.

Inputs: the data (path, size and modification time of every file, or a hub split's own
``datasets`` fingerprint), each dataset's spec (its ``dataset_info.json`` entry or detected
layout), the data config keys that change the content, the seed (mixing and the eval split
draw with it), the stage, the tokenizer (its full serialised state and special tokens), the
template (what it renders for a probe conversation), the code of this package and the
tokenizer libraries' versions. A change to any of them gives another key, so a stale cache is
never read; settings that only change how the data is *read* (workers, batching, packing,
streaming) are left out, so changing them keeps the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig
from tunelab.data.records import Message
from tunelab.data.sources import DatasetSpec
from tunelab.data.tables import sources_of
from tunelab.data.templates import ChatTemplate

#: data.* keys that do not change the tokenized content.
NOT_CONTENT = frozenset({"num_workers", "cache_dir", "packing", "pad_to_multiple_of", "group_by_length",
                         "streaming", "shuffle_buffer"})
# No system message: some templates reject one (data.system is part of the key anyway).
_PROBE = [Message("user", "U1"), Message("assistant", "A1"), Message("user", "U2"), Message("assistant", "A2")]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> str:
    """Hash of this package's source: a change to how rows are read, converted or tokenized is a new key."""
    package = Path(__file__).parent
    return _digest([(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(package.glob("*.py"))])


def tokenizer_key(tokenizer: Any) -> str:
    """The tokenizer's whole state (vocabulary, merges, normaliser, added tokens) and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    special = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.eos_token,
               tokenizer.bos_token, tokenizer.pad_token, getattr(tokenizer, "split_special_tokens", False)]
    return _digest([state, special])


def template_key(template: ChatTemplate) -> list[Any]:
    return [type(template).__name__, template.name, template.end_of_turn, template.render(_PROBE)]


def spec_key(spec: DatasetSpec) -> dict[str, Any]:
    layout = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in ("files", "hub")}
    return {**layout, "sources": [source.fingerprint() for source in sources_of(spec)]}


def cache_key(cfg: RunConfig, tokenizer: Any, template: ChatTemplate, train: list[DatasetSpec],
              evaluation: list[DatasetSpec]) -> tuple[str, dict[str, Any]]:
    """(key, the inputs it was computed from); the inputs are saved beside the cache to explain a miss."""
    import tokenizers
    import transformers

    inputs = {
        "code": code_version(),
        "stage": cfg.stage,
        "seed": cfg.train.seed,
        "data": cfg.data.model_dump(mode="json", exclude=set(NOT_CONTENT)),
        "train": [spec_key(spec) for spec in train],
        "eval": [spec_key(spec) for spec in evaluation],
        "tokenizer": tokenizer_key(tokenizer),
        "template": template_key(template),
        "libraries": [transformers.__version__, tokenizers.__version__],
    }
    return _digest(inputs)[:20], inputs
