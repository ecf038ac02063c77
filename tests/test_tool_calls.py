"""Tool calls: sharegpt function_call/observation turns and OpenAI tool_calls/tool messages keep their
structure, render through a tool-capable chat template (or the documented fallback format), supervise
exactly the assistant turns (calls included), mask tool results, prompt chat exactly as training
rendered, and name the file, record and field of a bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from tunelab.config import RunConfig
from tunelab.data.columns import from_row, to_row
from tunelab.data.formats import to_records
from tunelab.data.pipeline import build_data
from tunelab.data.records import IGNORE_INDEX, Conversation, Message, PromptExample, ToolCall
from tunelab.data.sources import DatasetRegistry, DatasetSpec, RawRow, read_rows
from tunelab.data.templates import get_template
from tunelab.data.tokenize import encode_conversation, encode_records
from tunelab.errors import DataError
from tunelab.inference import encode_prompt, wrap_run
from tunelab.testing.tiny import tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

# Compact templates of our own in the formats of Qwen2.5 (tools in the system block, <tool_call> JSON in the
# assistant turn, consecutive results in <tool_response> blocks under one user turn) and Llama 3.1 (tools in the
# first user turn, the call as the assistant's JSON, results under the ipython role, one call per turn).
QWEN_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + m.content }}"
    "{%- for call in m.tool_calls or [] %}{%- if m.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' + call.function.arguments | tojson"
    " + '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA31_STYLE = (
    "{%- set ns = namespace(tools_shown=false) %}{{- '<|begin_of_text|>' }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- elif m.role == 'user' %}{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{%- if tools and not ns.tools_shown %}"
    "{{- 'Given the following functions, respond with a JSON function call.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}"
    "{%- set ns.tools_shown = true %}{%- endif %}{{- m.content + '<|eot_id|>' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- if m.tool_calls %}"
    "{%- if m.tool_calls | length > 1 %}{{- raise_exception('This model only supports single tool calls.') }}"
    "{%- endif %}{{- '{\"name\": \"' + m.tool_calls[0].function.name + '\", \"parameters\": ' +"
    " m.tool_calls[0].function.arguments | tojson + '}' }}"
    "{%- else %}{{- m.content }}{%- endif %}{{- '<|eot_id|>' }}"
    "{%- elif m.role == 'tool' %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
TOOL_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", '
             '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
RESULT = '{"temp": 21}'

SHAREGPT = {"system": "Be brief.", "tools": json.dumps([WEATHER]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": CALL},
    {"from": "observation", "value": RESULT}, {"from": "gpt", "value": "21 degrees."}]}
OPENAI = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": RESULT}, {"role": "assistant", "content": "21 degrees."}]}
MESSAGES = [Message("system", "Be brief."), Message("user", "Weather in Paris?"),
            Message("assistant", "", (ToolCall("get_weather", {"city": "Paris"}),)), Message("tool", RESULT),
            Message("assistant", "21 degrees.")]

QWEN_TEXT = ("<|im_start|>system\nBe brief.\n\n# Tools\n\n<tools>\n" + TOOL_JSON + "\n</tools><|im_end|>\n"
             "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
             "<|im_start|>assistant\n<tool_call>\n" + CALL + "\n</tool_call><|im_end|>\n"
             "<|im_start|>user\n<tool_response>\n" + RESULT + "\n</tool_response><|im_end|>\n"
             "<|im_start|>assistant\n21 degrees.<|im_end|>\n")
QWEN_ANSWERS = ["<tool_call>\n" + CALL + "\n</tool_call><|im_end|>", "21 degrees.<|im_end|>"]
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_TEXT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, respond with a JSON "
              "function call.\n\n" + json.dumps(TOOLS[0], indent=4) + "\n\nWeather in Paris?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n" + LLAMA_CALL + "<|eot_id|>"
              "<|start_header_id|>ipython<|end_header_id|>\n\n" + RESULT + "<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n21 degrees.<|eot_id|>")
LLAMA_ANSWERS = [LLAMA_CALL + "<|eot_id|>", "21 degrees.<|eot_id|>"]
# The fallback format (README, Data): tools after the system text, calls as <tool_call> blocks, results as a user turn.
FALLBACK_SYSTEM = ("Be brief.\n\n# Tools\n\nYou may call one or more of these functions. To call one, write "
                   '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>; '
                   "its result comes back in <tool_response></tool_response>.\n\n<tools>\n" + TOOL_JSON + "\n</tools>")
FALLBACK_CHATML = ("<|im_start|>system\n" + FALLBACK_SYSTEM + "<|im_end|>\n"
                   "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                   "<|im_start|>assistant\n<tool_call>\n" + CALL + "\n</tool_call><|im_end|>\n"
                   "<|im_start|>user\n<tool_response>\n" + RESULT + "\n</tool_response><|im_end|>\n"
                   "<|im_start|>assistant\n21 degrees.<|im_end|>\n")
FALLBACK_LLAMA3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + FALLBACK_SYSTEM + "<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n<tool_call>\n" + CALL + "\n</tool_call><|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\n<tool_response>\n" + RESULT
                   + "\n</tool_response><|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n21 degrees.<|eot_id|>")


def _tokenizer(template: str | None, specials: list[str] = LLAMA_SPECIALS):
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tokenizers():
    return {"qwen": _tokenizer(QWEN_STYLE), "llama31": _tokenizer(LLAMA31_STYLE), "chatml": _tokenizer(None)}


# (tokenizer, data.template, whether it renders tools natively, rendered text, supervised runs)
CASES = {
    "qwen": ("qwen", "auto", True, QWEN_TEXT, QWEN_ANSWERS),
    "llama31": ("llama31", "auto", True, LLAMA_TEXT, LLAMA_ANSWERS),
    "fallback-auto": ("chatml", "auto", False, FALLBACK_CHATML, QWEN_ANSWERS),
    "fallback-llama3": ("chatml", "llama3", False, FALLBACK_LLAMA3,
                        ["<tool_call>\n" + CALL + "\n</tool_call><|eot_id|>", "21 degrees.<|eot_id|>"]),
}


def _record(data: dict, formatting: str) -> Conversation:
    records, _ = to_records([RawRow(data, "tools.json", None, 0)], DatasetSpec(name="tools", files=[],
                                                                              formatting=formatting))
    return records[0]  # type: ignore[return-value]


def _runs(tokenizer, example, supervised: bool = True) -> list[str]:
    """The decoded runs of consecutive tokens that are (or are not) supervised."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if (label != IGNORE_INDEX) == supervised:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize("data, formatting", [(SHAREGPT, "sharegpt"), (OPENAI, "openai")], ids=["sharegpt", "openai"])
def test_tool_turns_become_structured_messages(data, formatting):
    record = _record(data, formatting)
    assert record == Conversation(MESSAGES, "tools.json#0", TOOLS)


def test_parallel_calls_arguments_as_objects_and_bare_tool_definitions():
    record = _record({"tools": {"name": "t", "parameters": {"type": "object", "description": None}}, "conversations": [
        {"from": "human", "value": "both"},
        {"from": "function_call", "value": [{"name": "a", "arguments": {"x": 1, "y": None}},
                                           {"type": "function", "function": {"name": "b", "parameters": "{}"}}]},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "done"}]}, "sharegpt")
    assert record.messages[1].tool_calls == (ToolCall("a", {"x": 1}), ToolCall("b", {}))
    assert record.tools == [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}]


# --------------------------------------------------------------------------- rendering and masks


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("data, formatting", [(SHAREGPT, "sharegpt"), (OPENAI, "openai")], ids=["sharegpt", "openai"])
def test_rendering_and_exact_masks(tokenizers, case, data, formatting):
    name, template_name, native, text, answers = CASES[case]
    tokenizer = tokenizers[name]
    template = get_template(template_name, tokenizer)
    record = _record(data, formatting)
    assert template.supports_tools is native
    assert template.render(record.messages, tools=record.tools) == text
    example = encode_conversation(record, template, tokenizer, max_length=4096)
    assert _runs(tokenizer, example) == answers  # each assistant turn, its call included, with its end-of-turn
    masked = "".join(_runs(tokenizer, example, supervised=False))
    assert RESULT in masked and "Weather in Paris?" in masked
    assert tokenizer.decode(example.input_ids) == text.rstrip("\n")  # only the separator after the last answer is cut


def test_consecutive_results_are_one_masked_piece(tokenizers):
    """Two parallel calls answered by two tool messages: Qwen2.5 groups the results under one user turn,
    closed only after the last (the rendering after the first result is not a prefix of the whole)."""
    tokenizer = tokenizers["qwen"]
    calls = (ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Rome"}))
    messages = [Message("user", "Paris and Rome?"), Message("assistant", "", calls), Message("tool", "21"),
                Message("tool", "25"), Message("assistant", "21 and 25.")]
    example = encode_conversation(Conversation(messages, tools=TOOLS), get_template("auto", tokenizer), tokenizer, 4096)
    assert _runs(tokenizer, example) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "21 and 25.<|im_end|>"]
    assert _runs(tokenizer, example, supervised=False)[1] == (
        "\n<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n25\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_a_conversation_the_tool_template_rejects_names_the_record(tokenizers):
    calls = (ToolCall("a", {}), ToolCall("b", {}))
    record = Conversation([Message("user", "q"), Message("assistant", "", calls), Message("tool", "r"),
                           Message("assistant", "ok")], "calls.json#4", TOOLS)
    tokenizer = tokenizers["llama31"]
    with pytest.raises(DataError, match="calls.json#4: .*only supports single tool calls"):
        encode_records([record], get_template("auto", tokenizer), tokenizer, "sft", 4096)


# --------------------------------------------------------------------------- chat renders as training did


@pytest.mark.parametrize("case", ["qwen", "llama31", "fallback-auto"])
def test_chat_prompts_are_the_training_text_before_each_answer(tokenizers, tmp_path, case):
    """The run's template, reloaded from the run directory as chat/serve load it, prompts with exactly the
    training text (and ids) before each assistant turn, tools or not."""
    name = CASES[case][0]
    tokenizers[name].save_pretrained(tmp_path)
    loaded = wrap_run(None, tmp_path, RunConfig(), None)  # type: ignore[arg-type]
    training = get_template("auto", tokenizers[name])
    for tools in (TOOLS, []):
        example = encode_conversation(Conversation(MESSAGES, tools=tools), training, tokenizers[name], 4096)
        starts = [i for i in range(1, len(example.labels))
                  if example.labels[i] != IGNORE_INDEX and example.labels[i - 1] == IGNORE_INDEX]
        answers = [i for i, m in enumerate(MESSAGES) if m.role == "assistant"]
        assert len(starts) == len(answers) == 2
        for start, index in zip(starts, answers):
            if tools:
                prompt = loaded.tokenizer(loaded.template.render(MESSAGES[:index], True, tools=tools),
                                          add_special_tokens=False)["input_ids"]
            else:
                prompt = encode_prompt(loaded, MESSAGES[:index])
            assert prompt == example.input_ids[:start]


# --------------------------------------------------------------------------- bad records


def _bad(tmp_path: Path, record: dict, formatting: str) -> DataError:
    """The error converting ``record``, the second record of a JSON file."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([SHAREGPT if formatting == "sharegpt" else OPENAI, record]), encoding="utf-8")
    with pytest.raises(DataError) as info:
        to_records(read_rows(path), DatasetSpec(name="bad", files=[path], formatting=formatting))
    assert info.value.file == str(path) and info.value.record == 1
    assert f"file {path}, record 1, field '{info.value.field}'" in str(info.value)
    return info.value


def _sharegpt(*turns: tuple[str, object], **columns) -> dict:
    return {"conversations": [{"from": who, "value": value} for who, value in turns], **columns}


@pytest.mark.parametrize("record, formatting, field, message", [
    (_sharegpt(("human", "q"), ("function_call", '{"name": "f", "arguments": {city: 1}}'), ("observation", "r"),
               ("gpt", "a")), "sharegpt", "conversations[1].value", "invalid JSON in the function call (Expecting property name"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{'city': 'Paris'}"}}]}]},
     "openai", "messages[1].tool_calls[0].function.arguments", "invalid JSON in the arguments"),
    (_sharegpt(("human", "q"), ("function_call", '{"name": "f", "arguments": [1, 2]}'), ("observation", "r"),
               ("gpt", "a")), "sharegpt", "conversations[1].value.arguments",
     "the arguments are a list; expected a JSON object"),
    (_sharegpt(("human", "q"), ("function_call", '{"arguments": {}}')), "sharegpt", "conversations[1].value.name",
     "the function call has no name"),
    (_sharegpt(("human", "q"), ("observation", "r"), ("gpt", "a")), "sharegpt", "conversations[1]",
     "a tool result (observation) that follows no function call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}]}, "openai", "messages[2]",
     "a tool result (observation) that follows no function call"),
    (_sharegpt(("human", "q"), ("function_call", CALL), ("human", "again?"), ("gpt", "a")), "sharegpt",
     "conversations[2]", "found a 'user' turn right after a function call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "function", "content": "r"}]}, "openai", "messages[1]",
     "unknown role 'function' (key 'role')"),
    (_sharegpt(("human", "q"), ("function_call", CALL), ("observation", "r")), "sharegpt", "conversations",
     "the conversation ends with a tool result"),
    (_sharegpt(("human", "q"), ("gpt", "a"), tools="[{name: f}]"), "sharegpt", "tools", "invalid JSON in the tools"),
    (_sharegpt(("human", "q"), ("gpt", "a"), tools=[{"description": "no name"}]), "sharegpt", "tools[0]",
     "the tool definition has no name"),
], ids=["call-not-json", "arguments-not-json", "arguments-not-object", "call-without-name", "observation-first",
        "tool-after-answer", "user-after-call", "unknown-tool-role", "ends-with-result", "tools-not-json",
        "tool-without-name"])
def test_bad_tool_records_name_file_record_and_field(tmp_path, record, formatting, field, message):
    err = _bad(tmp_path, record, formatting)
    assert err.field == field and message in str(err)


def test_preference_answers_that_call_functions_are_refused(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}],
                                 "chosen": {"from": "function_call", "value": CALL},
                                 "rejected": {"from": "gpt", "value": "no"}}]), encoding="utf-8")
    with pytest.raises(DataError, match="field 'chosen': the chosen answer calls functions") as info:
        to_records(read_rows(path), DatasetSpec(name="p", files=[path], formatting="sharegpt", ranking=True))
    assert info.value.record == 0


# --------------------------------------------------------------------------- Arrow round trips


def test_prompt_rows_keep_tool_calls_through_arrow():
    prompt = PromptExample([1, 2, 3], MESSAGES[:4])
    table = pa.Table.from_pylist([to_row("prompt", prompt)])
    row = table.to_pylist()[0]
    assert from_row("prompt", row.__getitem__) == prompt


# Two records whose argument and tool objects have different keys.
HETEROGENEOUS = [
    {**OPENAI, "messages": [*OPENAI["messages"][:2], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        *OPENAI["messages"][3:]]},
    {"tools": [{"type": "function", "function": {"name": "convert", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}}}}}], "messages": [
        {"role": "user", "content": "3 EUR?"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "convert", "arguments": {"amount": 3}}}]}]}]


def test_cached_pipeline_matches_in_memory_encoding(tokenizers, tmp_path):
    """The example dataset, and a file whose argument and tool objects differ between records, through the
    datasets-backed cache (Arrow rows, map workers) give exactly the examples of converting and encoding the
    file in memory."""
    (tmp_path / "openai.json").write_text(json.dumps(HETEROGENEOUS), encoding="utf-8")
    tokenizer = tokenizers["qwen"]
    template = get_template("auto", tokenizer)
    for dataset, directory, count in (("tools_demo", EXAMPLES, 4), (str(tmp_path / "openai.json"), tmp_path, 2)):
        cfg = RunConfig.model_validate({"data": {"dataset_dir": str(directory), "train": [dataset], "num_workers": 1,
                                                 "cache_dir": str(tmp_path / "cache"), "max_length": 4096}})
        spec = DatasetRegistry(directory).resolve(dataset)
        records, _ = to_records(spec.rows(), spec)
        expected, _ = encode_records(records, template, tokenizer, "sft", 4096)
        assert len(expected) == count and list(build_data(cfg, tokenizer).train) == expected


def test_parquet_records_equal_json_records(tmp_path):
    """Arrow gives every object in a column every key seen in it (null where a record had none); those
    nulls are not arguments or schema members, so parquet and JSON files give the same records."""
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(HETEROGENEOUS), tmp_path / "tools.parquet")
    (tmp_path / "tools.json").write_text(json.dumps(HETEROGENEOUS), encoding="utf-8")
    converted = []
    for name in ("tools.parquet", "tools.json"):
        spec = DatasetSpec(name="t", files=[tmp_path / name], formatting="openai")
        converted.append([(r.messages, r.tools) for r in to_records(spec.rows(), spec)[0]])  # type: ignore[union-attr]
    assert converted[0] == converted[1]
    assert converted[0][1][1] == [{"type": "function", "function": {"name": "convert", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}}}}}]


def test_example_dataset_has_calls_results_and_a_direct_answer():
    spec = DatasetRegistry(EXAMPLES).resolve("tools_demo")
    records, stats = to_records(spec.rows(), spec)
    assert stats.kept == stats.total == 4
    calls = [len(m.tool_calls) for r in records for m in r.messages if m.tool_calls]  # type: ignore[union-attr]
    assert calls == [1, 1, 1, 2]  # one record calls twice in turn, one calls two tools at once
    assert not any(m.tool_calls for m in records[3].messages) and records[3].tools  # type: ignore[union-attr]
