"""A tokenizer as GGUF metadata: vocabulary, token types, merges, special ids, pre-tokenizer.

GGUF files carry no ``tokenizer.json``; llama.cpp (and transformers' GGUF reader) rebuild the
tokenizer from these keys. Byte-level BPE (the GPT-2 family: Llama 3, Qwen2, SmolLM, ...) is
supported; the vocabulary is written in its byte-level spelling with the merges as they are,
added special tokens marked CONTROL and other added tokens USER_DEFINED, which is what both
readers expect.

The pre-tokenizer (how text is split before merging) has no portable description in GGUF:
llama.cpp knows a list of named ones. The name is chosen from the ``tokenizer.json``
structure; a split regex is looked up in transformers' own table of llama.cpp names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError

#: GGUF token types (gguf.TokenType values).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GgufVocab:
    """Everything the ``tokenizer.ggml.*`` keys hold."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    add_bos: bool
    add_eos: bool
    notes: list[str] = field(default_factory=list)


def gguf_vocab(tokenizer: Any, vocab_size: int, end_of_turn: str) -> GgufVocab:
    """The GGUF vocabulary of ``tokenizer`` for a model with ``vocab_size`` embedding rows.

    Rows beyond the tokenizer's vocabulary (embeddings padded to a round size) become unused
    placeholder tokens: llama.cpp requires one token per row.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or not _byte_level(backend):
        raise ConfigError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM, "
                          f"...), but this tokenizer is a {backend['model']['type']} model without byte-level "
                          "pre-tokenization. Export with --format safetensors and convert with llama.cpp's own "
                          "converter.")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"the tokenizer has token ids up to {max(vocab.values())}, beyond the model's "
                          f"{vocab_size} embedding rows, so the GGUF file would name tokens the model cannot read.")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = CONTROL if added.special else USER_DEFINED
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in backend["model"]["merges"]]
    pre, notes = _pre_tokenizer_name(backend.get("pre_tokenizer"))
    probe = tokenizer("a")["input_ids"]
    eos = tokenizer.eos_token_id
    end = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"] if end_of_turn else []
    return GgufVocab(
        tokens=tokens, token_types=types, merges=merges, pre=pre, bos_id=tokenizer.bos_token_id, eos_id=eos,
        unk_id=tokenizer.unk_token_id, pad_id=tokenizer.pad_token_id,
        eot_id=end[0] if len(end) == 1 and end[0] != eos else None,
        add_bos=adds_bos(tokenizer),
        add_eos=eos is not None and len(probe) > 1 and probe[-1] == eos, notes=notes)


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding text puts the bos token first (llama.cpp then adds it itself, so a template must not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][0] == bos


def _byte_level(backend: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(backend.get("pre_tokenizer")) or "ByteLevel" in json.dumps(backend.get("decoder"))


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> tuple[str, list[str]]:
    """llama.cpp's name for this pre-tokenizer, and a note when none is known."""
    parts = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [part["type"] for part in parts or [] if part]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", []
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm", []  # GPT-2's split with every digit apart, as SmolLM's own GGUF files name it
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {}).get("Regex")
        name = next((name for name, regex in _known_splits().items() if regex == pattern), None)
        if name is not None:
            return name, []
    return "default", [f"the tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'}) has no llama.cpp name, so "
                       "the GGUF file says 'default': llama.cpp may split some text (digits, punctuation, "
                       "whitespace runs) into different tokens than transformers does"]


def _known_splits() -> dict[str, str]:
    """transformers' table of llama.cpp pre-tokenizer names -> split regex (empty if it moved)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    return dict(GGUF_PRE_TOKENIZER_SPLITS)
