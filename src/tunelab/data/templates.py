"""Chat templates: turning messages into the exact text a model is trained on and prompted with.

Training and inference must render identically, or a fine-tuned model is prompted in a format
it never saw. So there is one entry point, :meth:`ChatTemplate.render`, and everything else is
derived from it: the supervised/unsupervised split of a training conversation
(:meth:`ChatTemplate.segments`) is computed by rendering *prefixes* of the conversation with
that same function and diffing them. This works for any template, including arbitrary Jinja
chat templates shipped with tokenizers, without knowing their syntax:

- ``render(messages[:i])`` must be a prefix of ``render(messages[:i+1])``: the difference is
  the text of message ``i``;
- before an assistant message, ``render(messages[:i], add_generation_prompt=True)`` must also
  be a prefix: the part up to it is the prompt the model sees at inference, the rest is the
  answer, which is supervised up to and including its end-of-turn marker.

Templates that rewrite earlier turns (e.g. drop reasoning from past answers) break the first
rule and are rejected with a :class:`ConfigError` rather than trained on inconsistent text.
Consecutive tool results are one piece: templates may group them under one header that closes
only after the last (Qwen2.5 does), so the rendering after the first is not a prefix of the next.

Tool calls: a template that renders tools itself (the tokenizer's own, when it shows the tool
definitions, a call's arguments and a tool result) gets them structured, as
``apply_chat_template(messages, tools=...)`` with ``tool_calls`` on assistant messages, so an
agent model is trained in its own format. Every other template gets the fallback format of
:func:`plain_tool_messages`: tool definitions appended to the system message, calls as JSON
``<tool_call>`` blocks in the assistant's text (supervised with it), and tool results as a user
turn of ``<tool_response>`` blocks (not supervised).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from tunelab.data.records import Message, Tool, ToolCall
from tunelab.errors import ConfigError, DataError, TunelabError

Segment = tuple[str, bool]

_FIX = "set data.template to chatml, llama3 or alpaca"
# Content whose position in a rendered answer reveals what the template writes after an answer.
_PROBE_ANSWER = "TUNELAB-PROBE-ANSWER"
# A multi-turn conversation that exercises every transition a template renders (no system message:
# some templates reject one, and data without one must still work).
_PROBE = [Message("user", "U1"), Message("assistant", "A1"), Message("user", "U2"), Message("assistant", "A2")]
# A tool exchange whose markers all appear in the rendering of a template that supports tools.
_PROBE_TOOL_MARKERS = ("TUNELAB-PROBE-TOOL", "TUNELAB-PROBE-ARGUMENT", "TUNELAB-PROBE-RESULT")
_PROBE_TOOLS: list[Tool] = [{"type": "function", "function": {
    "name": "tunelab_probe", "description": _PROBE_TOOL_MARKERS[0],
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]
_PROBE_TOOL_CHAT = [Message("user", "U"),
                    Message("assistant", "", (ToolCall("tunelab_probe", {"text": _PROBE_TOOL_MARKERS[1]}),)),
                    Message("tool", _PROBE_TOOL_MARKERS[2]), Message("assistant", "A")]


class ChatTemplate(ABC):
    """Renders messages to text; subclasses only say how (:meth:`_render`).

    ``system`` is inserted as the first message when a conversation has none. It is applied
    inside :meth:`render` (and so in :meth:`segments` too), which keeps any default system prompt
    identical in training and inference. ``supports_tools`` says whether :meth:`_render` takes tool
    calls, tool turns and definitions as they are; otherwise :meth:`render` converts them to
    :func:`plain_tool_messages` first.
    """

    supports_tools = False

    def __init__(self, name: str, tokenizer: Any, end_of_turn: str, system: str | None):
        self.name = name
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn
        self.system = system

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Where generation ends: the end-of-turn marker, and eos for models that emit it instead."""
        eos = getattr(self.tokenizer, "eos_token", None)
        return tuple(dict.fromkeys(s for s in (self.end_of_turn, eos) if s))

    @abstractmethod
    def _render(self, messages: list[Message], tools: list[Tool] | None, add_generation_prompt: bool) -> str:
        """The template itself, applied to :meth:`_prepared` messages and tools."""

    def render(self, messages: list[Message], add_generation_prompt: bool = False,
               tools: list[Tool] | None = None) -> str:
        """The text of ``messages`` (offered ``tools``); with ``add_generation_prompt`` it ends where the
        answer starts."""
        return self._render(*self._prepared(messages, tools), add_generation_prompt)

    def segments(self, messages: list[Message], tools: list[Tool] | None = None) -> list[Segment]:
        """``(text, supervised)`` pieces whose concatenation is ``render(messages, tools=tools)``.

        An assistant turn (its text and tool calls) and its end-of-turn marker are supervised;
        everything else (system, user turns, tool results, role headers, the separator after an
        end-of-turn) is not.
        """
        messages, tools = self._prepared(messages, tools)
        if messages and messages[0].role == "assistant":
            raise DataError("the conversation starts with an assistant message, so there is no prompt to "
                            "answer.", hint="Start it with a user (or system) message.")
        full = self._render(messages, tools, False)
        pieces: list[Segment] = []
        done = ""
        for i, message in enumerate(messages):
            if message.role == "assistant":
                prompt = self._render_prefix(messages[:i], tools, True)
                pieces.append((self._after(done, prompt, f"the first {i} message(s) with the generation prompt"),
                               False))
                done = prompt
            if message.role == "tool" and i + 1 < len(messages) and messages[i + 1].role == "tool":
                continue  # templates may close a group of results only after the last one
            upto = full if i + 1 == len(messages) else self._render_prefix(messages[: i + 1], tools, False)
            delta = self._after(done, upto, f"the first {i + 1} message(s)")
            if message.role == "assistant":
                cut = self._supervised_end(delta)
                pieces += [(delta[:cut], True), (delta[cut:], False)]
            else:
                pieces.append((delta, False))
            done = upto
        return [(text, supervised) for text, supervised in pieces if text]

    def stop_token_ids(self) -> list[int]:
        """Ids of the stop strings that are single tokens (what ``generate(eos_token_id=...)`` takes)."""
        ids = []
        for text in self.stop_strings:
            encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.append(encoded[0])
        return ids

    # ------------------------------------------------------------------ helpers

    def _with_system(self, messages: list[Message]) -> list[Message]:
        if self.system is None or (messages and messages[0].role == "system"):
            return list(messages)
        return [Message("system", self.system), *messages]

    def _prepared(self, messages: list[Message], tools: list[Tool] | None) -> tuple[list[Message], list[Tool] | None]:
        """Messages with the default system prompt, and tools (None for none) as :meth:`_render` takes them."""
        messages = self._with_system(messages)
        if self.supports_tools or not (tools or any(m.role == "tool" or m.tool_calls for m in messages)):
            return messages, tools or None
        return plain_tool_messages(messages, tools or []), None

    def _render_prefix(self, messages: list[Message], tools: list[Tool] | None, add_generation_prompt: bool) -> str:
        """Render a prefix of a conversation that renders as a whole; failures are the template's."""
        try:
            return self._render(messages, tools, add_generation_prompt)
        except TunelabError as err:
            raise ConfigError(f"chat template '{self.name}' renders the whole conversation but fails on its "
                              f"first {len(messages)} message(s) ({err}), so the supervised part of each answer "
                              f"cannot be located; {_FIX}.") from None

    def _after(self, done: str, text: str, what: str) -> str:
        """The part of ``text`` after ``done``, which must be its prefix (the template is prefix-stable)."""
        if not text.startswith(done):
            raise ConfigError(f"chat template '{self.name}' is not prefix-stable: rendering {what} does not start "
                              f"with the rendering of the messages before them (the template rewrites earlier "
                              f"turns), so training text and inference prompts would disagree; {_FIX}.")
        return text[len(done):]

    def _supervised_end(self, answer: str) -> int:
        """Where the supervised part of a rendered answer ends: just after its end-of-turn marker."""
        at = answer.rfind(self.end_of_turn) if self.end_of_turn else -1
        return len(answer) if at < 0 else at + len(self.end_of_turn)


class JinjaTemplate(ChatTemplate):
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``)."""

    def __init__(self, tokenizer: Any, system: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.template is 'auto' but the tokenizer has no chat template (a base model?); "
                              f"{_FIX}.")
        super().__init__("auto", tokenizer, "", system)
        self.end_of_turn = self._probe_end_of_turn()
        try:  # fail now, at setup, rather than at record 5000
            self.segments(_PROBE)
        except DataError as err:
            raise ConfigError(f"the tokenizer's chat template cannot render a plain multi-turn chat ({err}); "
                              f"{_FIX}.") from None
        self.supports_tools = self._probe_tools()

    def _render(self, messages: list[Message], tools: list[Tool] | None, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template([_chat_message(m) for m in messages], tools=tools,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # Jinja raises arbitrary errors (raise_exception, UndefinedError, ...)
            raise DataError(f"the tokenizer's chat template rejected this conversation: {err}",
                            hint=f"Fix the roles/order of its messages, or {_FIX}.") from None

    def _probe_tools(self) -> bool:
        """Whether the template renders tool definitions, a call's arguments and a tool result (a template
        without tool support drops them, or rejects the ``tool`` role)."""
        try:
            text = self._render(self._with_system(_PROBE_TOOL_CHAT), _PROBE_TOOLS, False)
        except DataError:
            return False
        return all(marker in text for marker in _PROBE_TOOL_MARKERS)

    def _probe_end_of_turn(self) -> str:
        """The end-of-turn marker: the text after an answer, up to its first special token.

        Derived from a rendered probe answer instead of assuming eos, because chat models often
        end turns with a token that is not eos (e.g. Llama 3's <|eot_id|>). Empty when the
        template writes no special token after an answer (then the whole rendered answer is
        supervised).
        """
        prompt = [Message("user", "U")]
        try:
            text = self._render([*prompt, Message("assistant", _PROBE_ANSWER)], None, False)
        except DataError as err:
            raise ConfigError(f"the tokenizer's chat template cannot render a user/assistant exchange ({err}); "
                              f"{_FIX}.") from None
        start = text.find(_PROBE_ANSWER)
        if start < 0:
            raise ConfigError(f"the tokenizer's chat template drops or rewrites assistant answers, so they cannot be "
                              f"supervised; {_FIX}.")
        after = text[start + len(_PROBE_ANSWER):]
        specials = [t for t in _special_tokens(self.tokenizer) if t in after]
        if not specials:
            return ""
        first = min(specials, key=lambda t: (after.index(t), -len(t)))
        return after[:after.index(first) + len(first)]


def _chat_message(message: Message) -> dict[str, Any]:
    """A message as chat templates take it: OpenAI's layout, ``tool_calls`` only where there are calls."""
    chat: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        chat["tool_calls"] = [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                              for call in message.tool_calls]
    return chat


def _special_tokens(tokenizer: Any) -> set[str]:
    """Named special tokens plus added special tokens (chat markers such as <|eot_id|> are often only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {str(t) for t in tokenizer.all_special_tokens if t} | {
        t.content for t in added.values() if getattr(t, "special", False) and t.content}


@dataclass(frozen=True)
class TemplateSpec:
    """A chat format declared as data. ``{content}`` marks message text, ``{eos}`` the tokenizer's eos."""

    prefix: str  # written once, before the first message (e.g. a begin-of-text token)
    system: str
    user: str
    assistant: str  # the header before an answer: also the generation prompt
    end_of_turn: str  # after an answer; supervised, and where generation stops
    separator: str  # after end_of_turn; not supervised (generation never produces it)
    default_system: str | None = None


BUILTIN_TEMPLATES: dict[str, TemplateSpec] = {
    "chatml": TemplateSpec(
        prefix="",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        separator="\n",
    ),
    "llama3": TemplateSpec(
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        separator="",
    ),
    "alpaca": TemplateSpec(  # for base models: plain-text headers, the answer ends with eos
        prefix="",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant="### Response:\n",
        end_of_turn="{eos}",
        separator="\n\n",
        default_system="Below is an instruction that describes a task. "
                       "Write a response that appropriately completes the request.",
    ),
}


class BuiltinTemplate(ChatTemplate):
    """A :class:`TemplateSpec` rendered in Python."""

    def __init__(self, name: str, spec: TemplateSpec, tokenizer: Any, system: str | None = None):
        eos = getattr(tokenizer, "eos_token", None)
        if "{eos}" in spec.end_of_turn and not eos:
            raise ConfigError(f"data.template '{name}' ends answers with the tokenizer's eos token, but the "
                              "tokenizer defines none; set eos_token in the tokenizer or choose another template.")
        self.spec = spec
        super().__init__(name, tokenizer, spec.end_of_turn.replace("{eos}", eos or ""),
                         system if system is not None else spec.default_system)

    def _render(self, messages: list[Message], tools: list[Tool] | None, add_generation_prompt: bool) -> str:
        spec = self.spec
        parts = [spec.prefix]
        for message in messages:
            if message.role == "assistant":
                parts += [spec.assistant, message.content, self.end_of_turn, spec.separator]
            else:
                parts.append(getattr(spec, message.role).replace("{content}", message.content))
        if add_generation_prompt:
            parts.append(spec.assistant)
        return "".join(parts)


# --------------------------------------------------------------------------- fallback tool format

TOOLS_HEADER = ("# Tools\n\nYou may call one or more of these functions. To call one, write "
                '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>; '
                "its result comes back in <tool_response></tool_response>.\n\n<tools>\n")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def plain_tool_messages(messages: list[Message], tools: list[Tool]) -> list[Message]:
    """A tool conversation as system/user/assistant messages, for templates that cannot render tools.

    The tool definitions (one JSON object per line between ``<tools>`` and ``</tools>``, after
    :data:`TOOLS_HEADER`) end the system message, or make one. Each call becomes a block of three
    lines, ``<tool_call>``, ``{"name": ..., "arguments": {...}}``, ``</tool_call>``, after the
    assistant's text (one line apart). The results of consecutive tool turns become one user turn of
    such ``<tool_response>`` blocks, so turns still alternate user/assistant for any template.
    """
    plain: list[Message] = []
    previous = ""
    for message in messages:
        if message.role == "tool":
            block = f"<tool_response>\n{message.content}\n</tool_response>"
            if previous == "tool":
                plain[-1] = Message("user", f"{plain[-1].content}\n{block}")
            else:
                plain.append(Message("user", block))
        elif message.tool_calls:
            calls = [f"<tool_call>\n{_json({'name': c.name, 'arguments': c.arguments})}\n</tool_call>"
                     for c in message.tool_calls]
            plain.append(Message("assistant", "\n".join([message.content, *calls] if message.content else calls)))
        else:
            plain.append(message)
        previous = message.role
    if tools:
        listing = TOOLS_HEADER + "".join(_json(tool) + "\n" for tool in tools) + "</tools>"
        if plain and plain[0].role == "system":
            plain[0] = Message("system", f"{plain[0].content}\n\n{listing}" if plain[0].content else listing)
        else:
            plain.insert(0, Message("system", listing))
    return plain


def get_template(name: str, tokenizer: Any, system: str | None = None) -> ChatTemplate:
    """The chat template called ``name`` ("auto" = the tokenizer's own) for ``tokenizer``.

    ``system`` (config ``data.system``) is used for conversations without a system message,
    replacing any default a template would insert.
    """
    if name == "auto":
        return JinjaTemplate(tokenizer, system)
    if name in BUILTIN_TEMPLATES:
        return BuiltinTemplate(name, BUILTIN_TEMPLATES[name], tokenizer, system)
    raise ConfigError(f"data.template = {name!r} is not a known chat template. Use 'auto' (the tokenizer's own) "
                      f"or one of: {', '.join(BUILTIN_TEMPLATES)}.")
