"""Canonical records: every input format is converted into one of these.

Keeping exactly these few shapes between the file readers and the tokenizer means a new
input format is one converter, and every stage reads the same types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
#: The label of a position that takes no loss (the value torch's cross-entropy ignores by default).
IGNORE_INDEX = -100
#: A tool definition as chat templates take it (``apply_chat_template(tools=...)``):
#: ``{"type": "function", "function": {"name", "description", "parameters"}}``.
Tool = dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant turn makes. ``arguments`` is a parsed JSON object, not JSON
    text, because chat templates serialise it themselves (each in its own way)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Message:
    """One turn. An assistant turn may carry ``tool_calls`` (its ``content`` may then be empty);
    a ``tool`` turn holds a tool's result, answering the calls of the assistant turn before it."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass
class Conversation:
    """A chat: optional system message first, then user/assistant turns; an assistant turn that calls
    tools is followed by the tools' results (``tool`` turns) before the assistant continues.
    ``tools`` are the definitions the model was offered (rendered by the chat template)."""

    messages: list[Message]
    origin: str = ""  # "file:line" or "file#record", for error messages
    tools: list[Tool] = field(default_factory=list)


@dataclass
class Preference:
    """A prompt (conversation ending with a user turn) with a better and a worse answer."""

    prompt: list[Message]
    chosen: str
    rejected: str
    origin: str = ""
    tools: list[Tool] = field(default_factory=list)


@dataclass
class Unpaired:
    """KTO: a prompt, one answer, and whether that answer is desirable."""

    prompt: list[Message]
    completion: str
    desirable: bool
    origin: str = ""
    tools: list[Tool] = field(default_factory=list)


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
