"""Raw rows -> canonical records (:mod:`tunelab.data.records`).

One converter per layout, chosen by ``spec.formatting``; the record kind follows from the
spec: ``ranking`` -> :class:`Preference`, a ``kto_tag`` column -> :class:`Unpaired`,
``text`` -> :class:`Text`, otherwise :class:`Conversation`.

* alpaca: ``instruction`` + "\\n" + ``input`` (when non-empty) is the user turn, ``output``
  the answer; an optional ``system`` and ``history`` (``[[user, assistant], ...]``) come
  first. Preference rows give ``chosen``/``rejected`` (or ``output`` as ``[chosen, rejected]``).
* sharegpt / openai: a list of turns (``from``/``value`` or ``role``/``content``, renamed
  by ``spec.tags``). A leading system turn wins over a ``system`` column. Preference answers
  are strings or single message objects; KTO's completion is the last assistant turn.
* Tool use keeps its structure (rendered by :mod:`tunelab.data.templates`): a function call
  turn (``function_tag``, its value the JSON of ``{"name", "arguments"}`` or a list of them) or
  an assistant message with OpenAI ``tool_calls`` becomes an assistant message with
  :class:`ToolCall` s, arguments parsed to a JSON object; an observation / ``tool`` turn
  becomes a ``tool`` message, which must follow a call (or another result); the ``tools``
  column (JSON text or a list of function definitions, bare or OpenAI-wrapped) becomes the
  record's ``tools`` in OpenAI's ``{"type": "function", "function": {...}}`` form. Null members
  of arguments and definitions count as absent (:func:`_without_nulls`).
* text: one string column (``columns["prompt"]``, default ``text``).

Every problem raises :class:`DataError` naming the file, the line or record, and the field,
saying what is wrong and how to fix it. With ``on_error="skip"`` such rows are dropped and
counted in :class:`ConversionStats` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, NoReturn

from tunelab.data.records import Conversation, Message, Preference, Record, Role, Text, Tool, ToolCall, Unpaired
from tunelab.data.sources import DatasetSpec, RawRow, type_name
from tunelab.errors import DataError

OnError = Literal["raise", "skip"]
MAX_REASONS = 5

_FIX_HINT = ("Fix the record, map the right column in the dataset's dataset_info.json entry, or set "
             "data.on_error=skip to drop bad records.")
_TOOL_HINT = ('A function call is {"name": ..., "arguments": {...}} (or a list of them), as JSON text or an object; '
              'a tool definition is {"name", "description", "parameters"} or {"type": "function", "function": '
              '{...}}; a tool result (observation / tool turn) follows the call it answers. ' + _FIX_HINT)
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


@dataclass
class ConversionStats:
    """How many rows became records, and why the others were dropped (first few reasons)."""

    total: int = 0
    kept: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)


def to_records(rows: Iterable[RawRow], spec: DatasetSpec, on_error: OnError = "raise",
               require_answer: bool = True) -> tuple[list[Record], ConversionStats]:
    """Convert rows with ``spec``; on ``skip``, bad rows are counted instead of raising.

    ``require_answer=False`` accepts prompts without an answer (an empty alpaca output, a
    conversation ending with a user turn): prediction and PPO rollouts only need prompts.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    convert = _CONVERTERS[spec.formatting]
    records: list[Record] = []
    stats = ConversionStats()
    for row in rows:
        stats.total += 1
        try:
            records.append(convert(row, spec, require_answer))
        except DataError as err:
            if on_error == "raise":
                raise
            stats.skip(str(err))
    stats.kept = len(records)
    return records, stats


# --------------------------------------------------------------------------- field access


def _fail(row: RawRow, where: str, message: str, hint: str = _FIX_HINT) -> NoReturn:
    raise DataError(message, file=row.file, line=row.line, record=row.index, field=where, hint=hint)


def _requirement(spec: DatasetSpec) -> str:
    """What a record of this spec must contain, for 'field is missing' errors."""
    c = spec.columns
    if spec.formatting == "text":
        needed = [c["prompt"]]
    elif spec.formatting == "alpaca":
        needed = [c["prompt"]] + ([c["chosen"], c["rejected"]] if spec.ranking else [c["response"]])
    else:
        needed = [c["messages"]] + ([c["chosen"], c["rejected"]] if spec.ranking else [])
    if spec.kto:
        needed.append(c["kto_tag"])
    kind = "preference " if spec.ranking else "KTO " if spec.kto else ""
    return f"{spec.formatting} {kind}records need " + ", ".join(f"'{name}'" for name in needed)


def _required(row: RawRow, column: str, spec: DatasetSpec) -> Any:
    value = row.data.get(column)
    if value is None:
        _fail(row, column, f"the field is missing; {_requirement(spec)}.")
    return value


def _string(row: RawRow, where: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        _fail(row, where, f"the value is a {type_name(value)}; expected a string.")
    if not allow_empty and not value.strip():
        _fail(row, where, "the text is empty.")
    return value


def _optional_string(row: RawRow, column: str | None) -> str:
    """A string column that may be absent or null (read as "")."""
    value = row.data.get(column) if column else None
    return "" if value is None else _string(row, column or "", value, allow_empty=True)


def _flag(row: RawRow, spec: DatasetSpec) -> bool:
    """A KTO label: JSON booleans, 0/1, or true/false/yes/no strings (as csv files hold them)."""
    column = spec.columns["kto_tag"]
    value = _required(row, column, spec)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    _fail(row, column, f"the KTO label is {value!r}; expected true (desirable) or false (undesirable).")


# --------------------------------------------------------------------------- alpaca


def _history(row: RawRow, column: str | None) -> list[Message]:
    value = row.data.get(column) if column else None
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(row, column or "", f"history is a {type_name(value)}; expected a list of [user, assistant] pairs.")
    messages: list[Message] = []
    for i, pair in enumerate(value):
        where = f"{column}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            _fail(row, where, "each history item must be a [user, assistant] pair of strings.")
        messages += [Message("user", _string(row, where, pair[0])),
                     Message("assistant", _string(row, where, pair[1]))]
    return messages


def _alpaca_prompt(row: RawRow, spec: DatasetSpec) -> list[Message]:
    """System, history, then ``instruction\\ninput`` as the last user turn."""
    c = spec.columns
    instruction = _string(row, c["prompt"], _required(row, c["prompt"], spec), allow_empty=True)
    user = "\n".join(part for part in (instruction, _optional_string(row, c.get("query"))) if part.strip())
    if not user:
        _fail(row, c["prompt"], "the instruction (and input) are empty; the user turn needs text.")
    system = _optional_string(row, c.get("system"))
    head = [Message("system", system)] if system.strip() else []
    return head + _history(row, c.get("history")) + [Message("user", user)]


def _alpaca_pair(row: RawRow, spec: DatasetSpec) -> tuple[str, str]:
    """``chosen``/``rejected`` columns, or the older layout with ``output`` = [chosen, rejected]."""
    c = spec.columns
    output = row.data.get(c["response"])
    if c["chosen"] not in row.data and isinstance(output, list):
        if len(output) != 2:
            _fail(row, c["response"], f"the list has {len(output)} items; a preference output is [chosen, rejected].")
        return _string(row, c["response"], output[0]), _string(row, c["response"], output[1])
    return _answer(row, spec, "chosen"), _answer(row, spec, "rejected")


def _alpaca(row: RawRow, spec: DatasetSpec, require_answer: bool) -> Record:
    prompt = _alpaca_prompt(row, spec)
    tools = _tools(row, spec)
    if spec.ranking:
        chosen, rejected = _alpaca_pair(row, spec)
        return Preference(prompt=prompt, chosen=chosen, rejected=rejected, origin=row.origin, tools=tools)
    response = spec.columns["response"]
    if not require_answer and not spec.kto and not str(row.data.get(response) or "").strip():
        return Conversation(messages=prompt, origin=row.origin, tools=tools)
    answer = _string(row, response, _required(row, response, spec))
    if spec.kto:
        return Unpaired(prompt=prompt, completion=answer, desirable=_flag(row, spec), origin=row.origin, tools=tools)
    return Conversation(messages=prompt + [Message("assistant", answer)], origin=row.origin, tools=tools)


# --------------------------------------------------------------------------- sharegpt / openai


def _roles(spec: DatasetSpec) -> dict[str, Role]:
    """Role value in the file -> canonical role (a function call turn is an assistant turn)."""
    t = spec.tags
    return {t["user_tag"]: "user", t["observation_tag"]: "tool", t["assistant_tag"]: "assistant",
            t["function_tag"]: "assistant", t["system_tag"]: "system"}


def _content(row: RawRow, where: str, value: Any, *, allow_empty: bool = False) -> str:
    """A string, or OpenAI-style content parts ``[{"type": "text", "text": ...}]`` joined."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(part.get("text", "")) for part in value)
    return _string(row, where, value, allow_empty=allow_empty)


def _turn(row: RawRow, spec: DatasetSpec, where: str, turn: Any) -> Message:
    t = spec.tags
    if not isinstance(turn, dict):
        _fail(row, where, f"the turn is a {type_name(turn)}; expected an object with "
                          f"'{t['role_tag']}' and '{t['content_tag']}'.")
    roles = _roles(spec)
    raw_role = turn.get(t["role_tag"])
    if raw_role not in roles:
        _fail(row, where, f"unknown role {raw_role!r} (key '{t['role_tag']}'); expected one of "
                          f"{', '.join(repr(r) for r in roles)}.",
              hint="Set the dataset's \"tags\" (role_tag, user_tag, assistant_tag, observation_tag, function_tag, "
                   "...) in dataset_info.json to match the file.")
    value = turn.get(t["content_tag"])
    if raw_role == t["function_tag"]:
        return Message("assistant", "", _calls(row, f"{where}.{t['content_tag']}", value))
    role = roles[raw_role]
    calls: tuple[ToolCall, ...] = ()
    if role == "assistant" and turn.get("tool_calls"):  # OpenAI: the text may then be null or empty
        calls = _calls(row, f"{where}.tool_calls", turn["tool_calls"])
        value = "" if value is None else value
    return Message(role, _content(row, where, value, allow_empty=role == "system" or bool(calls)), calls)


def _parsed(row: RawRow, where: str, value: Any, what: str) -> Any:
    """``value``, or the JSON it holds when it is a string (files store calls and tools either way)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as err:
        _fail(row, where, f"invalid JSON in {what} ({err}): {value[:80]!r}.", hint=_TOOL_HINT)


def _without_nulls(value: Any) -> Any:
    """``value`` with every null member of an object dropped, at any depth.

    Arrow-typed files (parquet, arrow, hub datasets) give every object in a column every key seen
    in that column, null where a record had none, so a null member cannot be told from a missing
    one; treating both as missing makes a record render the same from any file type.
    """
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _calls(row: RawRow, where: str, value: Any) -> tuple[ToolCall, ...]:
    """One function call or a list of them (parallel calls)."""
    value = _parsed(row, where, value, "the function call")
    if isinstance(value, list):
        if not value:
            _fail(row, where, "the list of function calls is empty.", hint=_TOOL_HINT)
        return tuple(_call(row, f"{where}[{i}]", item) for i, item in enumerate(value))
    return (_call(row, where, value),)


def _call(row: RawRow, where: str, value: Any) -> ToolCall:
    """``{"name", "arguments"}``, or OpenAI's ``{"type": "function", "function": {...}}``; arguments are an
    object or the JSON text of one (OpenAI's layout); Llama's ``parameters`` is read as arguments."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value, where = value["function"], f"{where}.function"
    if not isinstance(value, dict):
        _fail(row, where, f"the function call is a {type_name(value)}; expected an object.", hint=_TOOL_HINT)
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        _fail(row, f"{where}.name", "the function call has no name (a non-empty string).", hint=_TOOL_HINT)
    key = "arguments" if "arguments" in value or "parameters" not in value else "parameters"
    arguments = _parsed(row, f"{where}.{key}", value.get(key, {}), "the arguments")
    if not isinstance(arguments, dict):
        _fail(row, f"{where}.{key}", f"the arguments are a {type_name(arguments)}; expected a JSON object of "
                                     "named arguments.", hint=_TOOL_HINT)
    return ToolCall(name, _without_nulls(arguments))


def _tools(row: RawRow, spec: DatasetSpec) -> list[Tool]:
    """The ``tools`` column: JSON text or a list of definitions (one object counts as a list of one)."""
    column = spec.columns.get("tools")
    value = _parsed(row, column or "", row.data.get(column) if column else None, "the tools")
    if value is None or value == "":
        return []
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        _fail(row, column or "", f"the tools are a {type_name(value)}; expected a list of function definitions.",
              hint=_TOOL_HINT)
    return [_tool(row, f"{column}[{i}]", item) for i, item in enumerate(items)]


def _tool(row: RawRow, where: str, value: Any) -> Tool:
    """A definition in OpenAI's wrapped form, which is what chat templates iterate over."""
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else value
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        _fail(row, where, "the tool definition has no name; expected an object with a 'name' (and 'description', "
                          "'parameters').", hint=_TOOL_HINT)
    return {"type": "function", "function": _without_nulls(function)}


def _allowed_next(previous: Message | None) -> tuple[Role, ...]:
    """The roles that may follow ``previous`` (None: the first turn after an optional system turn)."""
    if previous is None or (previous.role == "assistant" and not previous.tool_calls):
        return ("user",)
    if previous.role == "user":
        return ("assistant",)
    if previous.role == "assistant":
        return ("tool",)  # the results of its calls
    return ("tool", "assistant")


def _order_problem(message: Message, allowed: tuple[Role, ...]) -> str:
    if message.role == "tool":
        return ("a tool result (observation) that follows no function call; it must come right after the "
                "assistant turn (function call) whose call it answers, or after another result.")
    if allowed == ("tool",):
        return (f"found a {message.role!r} turn right after a function call; the call's result (an observation "
                "/ tool turn) must come next.")
    expected = " or ".join(repr(role) for role in allowed)
    return (f"found a {message.role!r} turn where {expected} was expected; turns must be an optional system "
            "turn, then alternate user/assistant starting with user (an assistant turn that calls functions "
            "is followed by their results, then the assistant continues).")


def _check_order(row: RawRow, column: str, turns: list[tuple[str, Message]]) -> None:
    """After an optional leading system turn: user, assistant, user, ..., with tool results after calls."""
    start = 1 if turns and turns[0][1].role == "system" else 0
    previous: Message | None = None
    for where, message in turns[start:]:
        allowed = _allowed_next(previous)
        if message.role not in allowed:
            _fail(row, where, _order_problem(message, allowed))
        previous = message
    if len(turns) == start:
        _fail(row, column, "the conversation has no user turn.")


def _chat_turns(row: RawRow, spec: DatasetSpec) -> list[Message]:
    """Validated turns with the system prompt (turn or column) first, empty system dropped."""
    column = spec.columns["messages"]
    value = _required(row, column, spec)
    if not isinstance(value, list) or not value:
        _fail(row, column, f"the value is {'an empty list' if value == [] else 'a ' + type_name(value)}; "
                           "expected a non-empty list of turns.")
    turns = [(f"{column}[{i}]", _turn(row, spec, f"{column}[{i}]", turn)) for i, turn in enumerate(value)]
    system = _optional_string(row, spec.columns.get("system"))
    if turns[0][1].role != "system" and system.strip():
        turns.insert(0, (spec.columns["system"], Message("system", system)))
    _check_order(row, column, turns)
    return [message for _, message in turns if message.role != "system" or message.content.strip()]


def _text_answer(row: RawRow, where: str, message: Message, what: str) -> str:
    """A preference or KTO answer is text: those objectives compare answers, not function calls."""
    if message.tool_calls:
        _fail(row, where, f"the {what} calls functions; preference and KTO answers must be text (tool-call "
                          "answers train with stage sft).", hint="Use this record for sft, or drop it.")
    return message.content


def _answer(row: RawRow, spec: DatasetSpec, key: str) -> str:
    """A preference answer: a string, or one assistant message object (LLaMA-Factory's layout)."""
    column = spec.columns[key]
    value = _required(row, column, spec)
    if isinstance(value, dict):
        message = _turn(row, spec, column, value)
        if message.role != "assistant":
            _fail(row, column, f"the {key} answer has role '{message.role}'; it must be an assistant message.")
        return _text_answer(row, column, message, f"{key} answer")
    return _content(row, column, value)


def _chat(row: RawRow, spec: DatasetSpec, require_answer: bool) -> Record:
    messages = _chat_turns(row, spec)
    tools = _tools(row, spec)
    column = spec.columns["messages"]
    last = messages[-1].role
    if spec.ranking:
        if last == "assistant":
            _fail(row, column, "the prompt ends with an assistant turn; a preference prompt must end with a "
                               "user turn (or a tool result), and the answers go in the chosen/rejected fields.")
        return Preference(prompt=messages, chosen=_answer(row, spec, "chosen"),
                          rejected=_answer(row, spec, "rejected"), origin=row.origin, tools=tools)
    if last != "assistant" and (require_answer or spec.kto):
        ending = "a tool result" if last == "tool" else f"a {last} turn"
        _fail(row, column, f"the conversation ends with {ending}; it must end with the assistant answer "
                           "to train on.", hint="Remove the trailing turn or add the answer.")
    if spec.kto:
        completion = _text_answer(row, f"{column}[{len(messages) - 1}]", messages[-1], "last assistant turn")
        return Unpaired(prompt=messages[:-1], completion=completion, desirable=_flag(row, spec),
                        origin=row.origin, tools=tools)
    return Conversation(messages=messages, origin=row.origin, tools=tools)


# --------------------------------------------------------------------------- text


def _text(row: RawRow, spec: DatasetSpec, require_answer: bool) -> Record:
    column = spec.columns["prompt"]
    return Text(text=_string(row, column, _required(row, column, spec)), origin=row.origin)


_CONVERTERS: dict[str, Callable[[RawRow, DatasetSpec, bool], Record]] = {
    "alpaca": _alpaca,
    "sharegpt": _chat,
    "openai": _chat,
    "text": _text,
}
