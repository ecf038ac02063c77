"""Converting raw rows into canonical records, and the errors bad rows produce."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunelab.data.formats import ConversionStats, to_records
from tunelab.data.records import Conversation, Message, Preference, Text, ToolCall, Unpaired
from tunelab.data.sources import DatasetSpec, RawRow, read_rows
from tunelab.errors import DataError

U, A, S = "user", "assistant", "system"


def rows(*records: dict, file: str = "d.jsonl") -> list[RawRow]:
    """Rows as a jsonl file would give them: line = index + 1."""
    return [RawRow(data=r, file=file, line=i + 1, index=i) for i, r in enumerate(records)]


def spec(formatting: str = "alpaca", **kwargs) -> DatasetSpec:
    return DatasetSpec(name="d", files=[], formatting=formatting, **kwargs)


def one(record: dict, dataset: DatasetSpec):
    records, _ = to_records(rows(record), dataset)
    return records[0]


def error(record: dict, dataset: DatasetSpec) -> DataError:
    """The error converting ``record`` as the second row (line 2, record 1) of a jsonl file."""
    with pytest.raises(DataError) as info:
        to_records(rows({"placeholder": 1}, record)[1:], dataset)
    return info.value


def roles(messages: list[Message]) -> list[str]:
    return [m.role for m in messages]


# --------------------------------------------------------------------------- alpaca


def test_alpaca_joins_instruction_and_input():
    record = one({"instruction": "Translate.", "input": "chat", "output": "cat"}, spec())
    assert record == Conversation([Message(U, "Translate.\nchat"), Message(A, "cat")], origin="d.jsonl:1")
    empty_input = one({"instruction": "Hi", "input": "", "output": "Hello"}, spec())
    assert empty_input.messages[0] == Message(U, "Hi")


def test_alpaca_system_and_history_come_first():
    record = one({"instruction": "q3", "output": "a3", "system": "Be brief.",
                  "history": [["q1", "a1"], ["q2", "a2"]]}, spec())
    assert [(m.role, m.content) for m in record.messages] == [
        (S, "Be brief."), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"), (U, "q3"), (A, "a3")]


def test_alpaca_custom_columns():
    dataset = spec(columns={"prompt": "q", "response": "a", "system": "sys"})
    record = one({"q": "Why?", "a": "Because.", "sys": "S"}, dataset)
    assert roles(record.messages) == [S, U, A] and record.messages[2].content == "Because."


def test_alpaca_missing_output_names_record_and_field():
    err = error({"instruction": "q"}, spec())
    assert (err.file, err.line, err.record, err.field) == ("d.jsonl", 2, 1, "output")
    assert "file d.jsonl, line 2, field 'output': the field is missing; alpaca records need " \
           "'instruction', 'output'." in str(err)


def test_json_list_record_missing_field_names_record_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "outptu": "d"}]')
    with pytest.raises(DataError, match=r"d.json, record 1, field 'output': the field is missing"):
        to_records(read_rows(path), spec())


@pytest.mark.parametrize("record, field, pattern", [
    ({"instruction": "q", "output": 3}, "output", "the value is a number; expected a string"),
    ({"instruction": "q", "output": "  "}, "output", "the text is empty"),
    ({"instruction": "", "input": "", "output": "a"}, "instruction", "the user turn needs text"),
    ({"instruction": "q", "output": "a", "history": "q1"}, "history", "history is a string"),
    ({"instruction": "q", "output": "a", "history": [["q1"]]}, "history[0]", r"\[user, assistant\] pair"),
    ({"instruction": "q", "output": "a", "history": [["q1", None]]}, "history[0]", "null; expected a string"),
    ({"instruction": "q", "output": "a", "system": ["s"]}, "system", "list; expected a string"),
])
def test_alpaca_bad_values_are_named(record, field, pattern):
    err = error(record, spec())
    assert err.field == field
    assert re.search(pattern, str(err))


def test_alpaca_instruction_may_be_empty_when_input_is_not():
    assert one({"instruction": "", "input": "2+2?", "output": "4"}, spec()).messages[0] == Message(U, "2+2?")


def test_alpaca_ranking_with_chosen_rejected_and_with_output_pair():
    dataset = spec(ranking=True)
    pair = one({"instruction": "q", "input": "x", "chosen": "good", "rejected": "bad"}, dataset)
    assert pair == Preference([Message(U, "q\nx")], "good", "bad", origin="d.jsonl:1")
    legacy = one({"instruction": "q", "output": ["good", "bad"]}, dataset)
    assert (legacy.chosen, legacy.rejected) == ("good", "bad")
    err = error({"instruction": "q", "chosen": "good"}, dataset)
    assert err.field == "rejected" and "alpaca preference records need 'instruction', 'chosen', 'rejected'" \
        in str(err)
    assert "[chosen, rejected]" in str(error({"instruction": "q", "output": ["a", "b", "c"]}, dataset))


@pytest.mark.parametrize("label, desirable", [(True, True), (False, False), ("true", True), ("No", False),
                                              (1, True), (0, False)])
def test_alpaca_kto_labels(label, desirable):
    record = one({"instruction": "q", "output": "a", "kto_tag": label}, spec(columns={"kto_tag": "kto_tag"}))
    assert record == Unpaired([Message(U, "q")], "a", desirable, origin="d.jsonl:1")


def test_kto_label_errors():
    dataset = spec(columns={"kto_tag": "label"})
    assert "expected true (desirable) or false" in str(error({"instruction": "q", "output": "a", "label": "meh"},
                                                             dataset))
    assert "the field is missing; alpaca KTO records need 'instruction', 'output', 'label'" in \
        str(error({"instruction": "q", "output": "a"}, dataset))


# --------------------------------------------------------------------------- sharegpt


def turn(role: str, value, role_key: str = "from", content_key: str = "value") -> dict:
    return {role_key: role, content_key: value}


def test_sharegpt_default_tags_and_system_column():
    record = one({"system": "sys", "conversations": [turn("human", "q1"), turn("gpt", "a1"),
                                                     turn("human", "q2"), turn("gpt", "a2")]}, spec("sharegpt"))
    assert [(m.role, m.content) for m in record.messages] == [(S, "sys"), (U, "q1"), (A, "a1"), (U, "q2"),
                                                              (A, "a2")]


def test_sharegpt_system_turn_wins_over_system_column():
    record = one({"system": "column", "conversations": [turn("system", "turn"), turn("human", "q"),
                                                        turn("gpt", "a")]}, spec("sharegpt"))
    assert record.messages[0] == Message(S, "turn") and len(record.messages) == 3


def test_sharegpt_custom_tags():
    tags = {"role_tag": "who", "content_tag": "says", "user_tag": "me", "assistant_tag": "bot",
            "observation_tag": "result", "function_tag": "call", "system_tag": "rules"}
    dataset = spec("sharegpt", columns={"messages": "chat"}, tags=tags)
    chat = [turn("rules", "r", "who", "says"), turn("me", "q", "who", "says"),
            turn("call", '{"name": "f", "arguments": {"x": 1}}', "who", "says"),
            turn("result", "42", "who", "says"), turn("bot", "It is 42.", "who", "says")]
    record = one({"chat": chat}, dataset)
    assert roles(record.messages) == [S, U, A, "tool", A] and record.messages[3].content == "42"
    assert record.messages[2].tool_calls == (ToolCall("f", {"x": 1}),)


def test_sharegpt_unknown_role_points_at_tags():
    err = error({"conversations": [turn("user", "q"), turn("gpt", "a")]}, spec("sharegpt"))
    assert err.field == "conversations[0]" and "unknown role 'user' (key 'from')" in str(err)
    assert "'human'" in str(err) and '"tags"' in str(err)


@pytest.mark.parametrize("conversation, field, pattern", [
    ([turn("human", "q"), turn("human", "q2"), turn("gpt", "a")], "conversations[1]",
     "found a 'user' turn where 'assistant' was expected"),
    ([turn("gpt", "a"), turn("human", "q")], "conversations[0]", "found a 'assistant' turn where 'user'"),
    ([turn("human", "q"), turn("gpt", "a"), turn("system", "s"), turn("gpt", "a")], "conversations[2]",
     "found a 'system' turn where 'user'"),
    ([turn("human", "q"), turn("gpt", "a"), turn("human", "q2")], "conversations", "ends with a user turn"),
    ([turn("human", "q"), turn("gpt", "")], "conversations[1]", "the text is empty"),
    ([turn("human", "q"), turn("gpt", {"text": "a"})], "conversations[1]", "object; expected a string"),
    ([turn("human", "q"), "gpt: a"], "conversations[1]", "the turn is a string"),
    ([turn("system", "s")], "conversations", "no user turn"),
    ([], "conversations", "an empty list"),
])
def test_sharegpt_bad_conversations_are_named(conversation, field, pattern):
    err = error({"conversations": conversation}, spec("sharegpt"))
    assert err.field == field and pattern in str(err) and err.line == 2


def test_sharegpt_messages_must_be_a_list():
    err = error({"conversations": "hello"}, spec("sharegpt"))
    assert "the value is a string; expected a non-empty list of turns" in str(err)


def test_sharegpt_ranking_takes_message_objects():
    dataset = spec("sharegpt", ranking=True)
    record = one({"conversations": [turn("human", "q")], "chosen": turn("gpt", "good"),
                  "rejected": turn("gpt", "bad")}, dataset)
    assert record == Preference([Message(U, "q")], "good", "bad", origin="d.jsonl:1")
    ends_with_answer = {"conversations": [turn("human", "q"), turn("gpt", "a")], "chosen": "x", "rejected": "y"}
    assert "a preference prompt must end with a user turn" in str(error(ends_with_answer, dataset))
    user_answer = {"conversations": [turn("human", "q")], "chosen": turn("human", "x"), "rejected": "y"}
    err = error(user_answer, dataset)
    assert err.field == "chosen" and "has role 'user'" in str(err)


def test_sharegpt_kto_completion_is_last_assistant_turn():
    dataset = spec("sharegpt", columns={"kto_tag": "label"})
    record = one({"conversations": [turn("human", "q1"), turn("gpt", "a1"), turn("human", "q2"),
                                    turn("gpt", "a2")], "label": False}, dataset)
    assert roles(record.prompt) == [U, A, U] and record.completion == "a2" and record.desirable is False


# --------------------------------------------------------------------------- openai


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


def test_openai_messages_with_tools_and_content_parts():
    record = one({"messages": [msg("system", "sys"), msg("user", [{"type": "text", "text": "What "},
                                                                  {"type": "text", "text": "time?"}]),
                               msg("function_call", '{"name": "now"}'), msg("tool", "12:00"),
                               msg("assistant", "Noon.")]}, spec("openai"))
    assert [(m.role, m.content, m.tool_calls) for m in record.messages] == [
        (S, "sys", ()), (U, "What time?", ()), (A, "", (ToolCall("now", {}),)), ("tool", "12:00", ()),
        (A, "Noon.", ())]


def test_openai_empty_system_is_dropped():
    record = one({"messages": [msg("system", ""), msg("user", "q"), msg("assistant", "a")]}, spec("openai"))
    assert roles(record.messages) == [U, A]


def test_openai_preference_answers_as_strings_or_messages():
    dataset = spec("openai", ranking=True)
    record = one({"messages": [msg("user", "q")], "chosen": "good", "rejected": msg("assistant", "bad")}, dataset)
    assert (record.chosen, record.rejected) == ("good", "bad")
    err = error({"messages": [msg("user", "q")], "chosen": "good"}, dataset)
    assert err.field == "rejected" and "openai preference records need 'messages', 'chosen', 'rejected'" \
        in str(err)


def test_openai_non_string_content_is_named():
    err = error({"messages": [msg("user", "q"), msg("assistant", None)]}, spec("openai"))
    assert err.field == "messages[1]" and "null; expected a string" in str(err)


# --------------------------------------------------------------------------- text


def test_text_records_default_and_custom_column():
    assert one({"text": "doc"}, spec("text")) == Text("doc", origin="d.jsonl:1")
    assert one({"body": "doc2"}, spec("text", columns={"prompt": "body"})).text == "doc2"
    err = error({"body": "x"}, spec("text"))
    assert err.field == "text" and "text records need 'text'" in str(err)


# --------------------------------------------------------------------------- error policy


def test_skip_keeps_good_rows_and_counts_the_rest():
    data = [{"instruction": "q1", "output": "a1"}, {"instruction": "q2"}, {"instruction": "q3", "output": 5},
            {"instruction": "q4", "output": "a4"}]
    records, stats = to_records(rows(*data), spec(), on_error="skip")
    assert [r.messages[0].content for r in records] == ["q1", "q4"]
    assert (stats.total, stats.kept, stats.skipped) == (4, 2, 2)
    assert "line 2, field 'output'" in stats.reasons[0] and "line 3" in stats.reasons[1]
    assert stats.reasons[0].startswith("file d.jsonl, line 2")


def test_skip_reasons_are_capped():
    stats = ConversionStats()
    for i in range(8):
        stats.skip(f"r{i}")
    assert stats.skipped == 8 and stats.reasons == ["r0", "r1", "r2", "r3", "r4"]


def test_raise_stops_at_first_bad_row():
    with pytest.raises(DataError, match="line 2"):
        to_records(rows({"text": "a"}, {"text": 1}, {"text": None}), spec("text"))


def test_invalid_on_error_value():
    with pytest.raises(ValueError, match="on_error"):
        to_records([], spec(), on_error="ignore")  # type: ignore[arg-type]


def test_end_to_end_jsonl_error_names_file_line_and_field(tmp_path: Path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n')
    with pytest.raises(DataError) as info:
        to_records(read_rows(path), spec("openai"))
    assert str(info.value).startswith(f"file {path}, line 2, field 'messages[1]': unknown role 'bot'")
