"""Canonical records: every input format is converted into one of these.

Keeping exactly these few shapes between the file readers and the tokenizer means a new
input format is one converter, and every stage reads the same types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
#: The label of a position that takes no loss (the value torch's cross-entropy ignores by default).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass
class Conversation:
    """A chat: optional system message first, then alternating user/assistant turns."""

    messages: list[Message]
    origin: str = ""  # "file:line" or "file#record", for error messages


@dataclass
class Preference:
    """A prompt (conversation ending with a user turn) with a better and a worse answer."""

    prompt: list[Message]
    chosen: str
    rejected: str
    origin: str = ""


@dataclass
class Unpaired:
    """KTO: a prompt, one answer, and whether that answer is desirable."""

    prompt: list[Message]
    completion: str
    desirable: bool
    origin: str = ""


@dataclass
class Text:
    """Plain text for continued pre-training."""

    text: str
    origin: str = ""


Record = Conversation | Preference | Unpaired | Text


@dataclass
class Example:
    """A tokenized sequence. ``labels`` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class PairExample:
    chosen: Example
    rejected: Example


@dataclass
class UnpairedExample:
    example: Example
    desirable: bool


@dataclass
class PromptExample:
    """PPO: only the prompt's token ids; the policy writes the answer."""

    prompt_ids: list[int]
    prompt: list[Message] = field(default_factory=list)
