"""Reading dataset files into rows, and resolving names through dataset_info.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from tunelab.data.formats import to_records
from tunelab.data.records import Conversation, Message, Preference, Text, ToolCall, Unpaired
from tunelab.data.sources import INFO_FILE, DatasetRegistry, DatasetSpec, RawRow, detect_spec, read_rows
from tunelab.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def lines_and_data(path: Path) -> list[tuple[int | None, int, dict]]:
    return [(row.line, row.index, row.data) for row in read_rows(path)]


# --------------------------------------------------------------------------- file readers


def test_json_list_rows_have_indices_and_no_lines(tmp_path):
    path = write(tmp_path / "d.json", '[\n {"a": 1},\n {"a": 2}\n]')
    rows = list(read_rows(path))
    assert [(r.line, r.index, r.data) for r in rows] == [(None, 0, {"a": 1}), (None, 1, {"a": 2})]
    assert rows[1].origin == f"{path}#1"


def test_json_file_holding_json_lines_keeps_line_numbers(tmp_path):
    path = write(tmp_path / "d.json", '{"a": 1}\n\n{"a": 2}\n')
    assert lines_and_data(path) == [(1, 0, {"a": 1}), (3, 1, {"a": 2})]
    assert list(read_rows(path))[1].origin == f"{path}:3"


def test_json_single_pretty_printed_object_is_one_record(tmp_path):
    path = write(tmp_path / "d.json", '\n{\n  "a": 1\n}\n')
    assert lines_and_data(path) == [(2, 0, {"a": 1})]


def test_jsonl_skips_blank_lines_and_counts_them(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n\n  \n{"a": 2}\n')
    assert lines_and_data(path) == [(1, 0, {"a": 1}), (4, 1, {"a": 2})]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_broken_json_line_names_file_and_exact_line(tmp_path, suffix):
    path = write(tmp_path / f"d{suffix}", '{"a": 1}\n{"a": 2}\n\n{"a": 3,,}\n{"a": 4}\n')
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert info.value.line == 4 and info.value.file == str(path)
    assert f"file {path}, line 4: invalid JSON" in str(info.value)
    assert "column 9" in str(info.value)


def test_broken_json_list_names_line_and_column(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"a": 1},\n  {"a": 2}\n  {"a": 3}\n]')
    with pytest.raises(DataError, match=r"line 4, column 3"):
        list(read_rows(path))


def test_non_object_record_names_line_or_record(tmp_path):
    jsonl = write(tmp_path / "d.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: the record is a list, not an object"):
        list(read_rows(jsonl))
    listed = write(tmp_path / "e.json", '[{"a": 1}, {"a": 2}, "oops"]')
    with pytest.raises(DataError, match=r"record 2: the record is a string, not an object"):
        list(read_rows(listed))


def test_json_scalar_document_is_rejected(tmp_path):
    with pytest.raises(DataError, match="single JSON number"):
        list(read_rows(write(tmp_path / "d.json", "42")))


def test_csv_rows_start_lines_survive_multiline_cells():
    rows = list(read_rows(FIXTURES / "dpo_alpaca_demo.csv"))
    assert [row.line for row in rows] == [2, 3, 4]
    assert rows[0].data["input"] == "The cat, which was black, slept all day."
    assert rows[2].data["instruction"] == "Write a two-line poem\nabout rain."
    assert rows[2].data["input"] == ""


def test_csv_row_with_extra_values_names_its_line(tmp_path):
    path = write(tmp_path / "d.csv", "instruction,output\nhi,there\na,b,c\n")
    with pytest.raises(DataError, match=r"line 3: the row has 1 more value"):
        list(read_rows(path))


def test_parquet_rows_keep_nested_values(tmp_path):
    path = tmp_path / "d.parquet"
    frame = pd.DataFrame({"instruction": ["q1", "q2"], "history": [[["u", "a"]], []]})
    frame.to_parquet(path)
    rows = list(read_rows(path))
    assert [(r.line, r.index) for r in rows] == [(None, 0), (None, 1)]
    assert rows[0].data == {"instruction": "q1", "history": [["u", "a"]]}


def test_corrupt_parquet_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read the parquet file"):
        list(read_rows(write(tmp_path / "d.parquet", "not parquet")))


def test_arrow_stream_as_saved_by_datasets(tmp_path):
    path = tmp_path / "data-00000-of-00001.arrow"
    table = pa.table({"text": ["one", "two"]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert [r.data for r in read_rows(path)] == [{"text": "one"}, {"text": "two"}]


def test_txt_each_non_blank_line_is_a_text_record():
    rows = list(read_rows(FIXTURES / "wiki_demo.txt"))
    assert [row.line for row in rows] == [1, 3, 4]
    assert rows[1].data == {"text": "Tides rise and fall twice a day on most coasts."}


def test_directory_reads_supported_files_sorted(tmp_path):
    write(tmp_path / "b.jsonl", '{"n": 2}\n')
    write(tmp_path / "a.json", '[{"n": 1}]')
    write(tmp_path / "notes.md", "ignored")
    write(tmp_path / "state.json", '{"_fingerprint": "x"}')  # datasets metadata, not a record
    rows = list(read_rows(tmp_path))
    assert [row.data["n"] for row in rows] == [1, 2]
    assert [Path(row.file).name for row in rows] == ["a.json", "b.jsonl"]


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(DataError, match="contains no dataset files"):
        list(read_rows(tmp_path))


def test_unsupported_extension_lists_supported(tmp_path):
    with pytest.raises(DataError) as info:
        list(read_rows(write(tmp_path / "d.xlsx", "x")))
    message = str(info.value)
    assert "unsupported file type '.xlsx'" in message
    for suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt"):
        assert suffix in message


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_rows(tmp_path / "nope.jsonl"))


def test_spec_rows_chain_files(tmp_path):
    a = write(tmp_path / "a.jsonl", '{"text": "x"}\n')
    b = write(tmp_path / "b.txt", "y\n")
    spec = DatasetSpec(name="t", files=[a, b], formatting="text")
    assert [(Path(r.file).name, r.data["text"]) for r in spec.rows()] == [("a.jsonl", "x"), ("b.txt", "y")]


# --------------------------------------------------------------------------- specs


def test_spec_merges_defaults_per_formatting():
    spec = DatasetSpec(name="s", files=[], formatting="sharegpt", columns={"messages": "dialog"},
                       tags={"user_tag": "user"})
    assert spec.columns["messages"] == "dialog" and spec.columns["system"] == "system"
    assert spec.tags["user_tag"] == "user" and spec.tags["assistant_tag"] == "gpt"
    alpaca = DatasetSpec(name="a", files=[])
    assert (alpaca.columns["prompt"], alpaca.columns["query"], alpaca.columns["response"]) == \
        ("instruction", "input", "output")
    assert not alpaca.kto and DatasetSpec(name="k", files=[], columns={"kto_tag": "label"}).kto


@pytest.mark.parametrize("kwargs, pattern", [
    ({"columns": {"promt": "q"}}, r"unknown column key 'promt'.*Did you mean 'prompt'"),
    ({"tags": {"role": "r"}}, r"unknown tag key 'role'.*Did you mean 'role_tag'"),
    ({"formatting": "xml"}, r"unknown formatting 'xml'"),
    ({"columns": {"images": "images"}}, r"maps images columns; tunelab trains text-only"),
    ({"ranking": True, "columns": {"kto_tag": "label"}}, r"both ranking and a kto_tag"),
])
def test_spec_rejects_bad_entries(kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        DatasetSpec(name="d", files=[], **kwargs)


@pytest.mark.parametrize("record, formatting, ranking, kto, columns", [
    ({"instruction": "q", "output": "a"}, "alpaca", False, False, {"prompt": "instruction"}),
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", False, False,
     {"messages": "conversations"}),
    ({"conversations": [{"role": "user", "content": "q"}]}, "openai", False, False,
     {"messages": "conversations"}),
    ({"messages": [{"role": "user", "content": "q"}]}, "openai", False, False, {"messages": "messages"}),
    ({"messages": [{"role": "user", "content": "q"}], "label": True}, "openai", False, True,
     {"kto_tag": "label"}),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {}, "rejected": {}}, "sharegpt", True,
     False, {}),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "alpaca", True, False, {"prompt": "prompt"}),
    ({"prompt": "q", "completion": "a", "label": False}, "alpaca", False, True,
     {"prompt": "prompt", "response": "completion"}),
    ({"text": "t"}, "text", False, False, {"prompt": "text"}),
])
def test_detect_spec_from_first_record(tmp_path, record, formatting, ranking, kto, columns):
    path = write(tmp_path / "d.jsonl", json.dumps(record) + "\n")
    spec = detect_spec(path)
    assert (spec.formatting, spec.ranking, spec.kto) == (formatting, ranking, kto)
    assert {key: spec.columns[key] for key in columns} == columns


def test_detect_spec_unknown_layout_lists_keys(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"first record's keys \(answer, question\)"):
        detect_spec(path)
    with pytest.raises(DataError, match="no records"):
        detect_spec(write(tmp_path / "e.jsonl", "\n"))


# --------------------------------------------------------------------------- the registry

EXPECTED = {  # name -> (record type, count)
    "identity": (Conversation, 3),
    "glaive_toolcall_demo": (Conversation, 3),
    "support_chat_demo": (Conversation, 3),
    "dpo_en_demo": (Preference, 3),
    "dpo_alpaca_demo": (Preference, 3),
    "kto_en_demo": (Unpaired, 3),
    "c4_demo": (Text, 3),
    "wiki_demo": (Text, 3),
}


@pytest.fixture(scope="module")
def registry() -> DatasetRegistry:
    return DatasetRegistry(FIXTURES)


def convert(registry: DatasetRegistry, name: str) -> list:
    spec = registry.resolve(name)
    records, stats = to_records(spec.rows(), spec)
    assert stats.skipped == 0 and stats.kept == stats.total == len(records)
    return records


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_llamafactory_entries_resolve_and_convert_unchanged(registry, name):
    kind, count = EXPECTED[name]
    records = convert(registry, name)
    assert len(records) == count and all(type(r) is kind for r in records)


def test_identity_entry_is_alpaca_with_system_and_history(registry):
    spec = registry.resolve("identity")
    assert spec.formatting == "alpaca" and spec.files == [FIXTURES / "identity.json"]
    records = convert(registry, "identity")
    assert records[1].messages[0] == Message("user", "Introduce yourself in one sentence.\nKeep it short.")
    assert [m.role for m in records[2].messages] == ["system", "user", "assistant", "user", "assistant",
                                                     "user", "assistant"]
    assert records[2].messages[1].content == "Hello!" and records[2].messages[-1].content == "Still Tunebot."
    assert records[2].origin == f"{FIXTURES / 'identity.json'}#2"


def test_toolcall_turns_keep_their_structure(registry):
    first, _, third = convert(registry, "glaive_toolcall_demo")
    assert [m.role for m in first.messages] == ["user", "assistant", "tool", "assistant"]
    assert first.messages[1].tool_calls == (ToolCall("multiply", {"a": 17, "b": 23}),)
    assert first.messages[2].content == '{"result": 391}'
    assert third.messages[0] == Message("system", "You answer tersely.")


def test_custom_tags_and_system_column(registry):
    records = convert(registry, "support_chat_demo")
    assert records[0].messages[0] == Message("system", "You are a polite support agent.")
    assert [m.role for m in records[0].messages[1:]] == ["user", "assistant", "user", "assistant"]
    assert records[1].messages[0] == Message("system", "You only answer billing questions.")
    assert [m.role for m in records[2].messages] == ["user", "assistant"]  # empty persona: no system
    assert records[2].origin.endswith("support_chat_demo.jsonl:3")


def test_ranking_entries(registry):
    pairs = convert(registry, "dpo_en_demo")
    assert [m.role for m in pairs[1].prompt] == ["user", "assistant", "user"]
    assert (pairs[1].chosen, pairs[1].rejected) == ("Often orange and red.", "Green, always.")
    csv_pairs = convert(registry, "dpo_alpaca_demo")
    assert csv_pairs[0].prompt == [Message("user", "Summarise the sentence.\n"
                                                   "The cat, which was black, slept all day.")]
    assert csv_pairs[2].chosen == "Rain taps the glass,\nthe evening hums."


def test_kto_entry(registry):
    records = convert(registry, "kto_en_demo")
    assert [r.desirable for r in records] == [True, False, True]
    assert records[2].completion == "4" and [m.role for m in records[2].prompt] == ["user", "assistant", "user"]


def test_text_entries(registry):
    assert registry.resolve("c4_demo").formatting == "text"
    assert convert(registry, "wiki_demo")[2].text == "Sea salt is made by evaporating seawater."


@pytest.mark.parametrize("name, source", [("alpaca_en", "hf_hub_url 'llamafactory/alpaca_en'"),
                                          ("hh_rlhf_en", "script_url 'hh_rlhf_en'")])
def test_hub_only_entry_explains_offline(registry, name, source):
    with pytest.raises(DataError) as info:
        registry.resolve(name)
    message = str(info.value)
    assert f"dataset '{name}' is only available from {source}" in message
    assert "cannot be downloaded here" in message and 'set "file_name"' in message


def test_unknown_name_suggests_closest(registry):
    with pytest.raises(DataError) as info:
        registry.resolve("identiy")
    message = str(info.value)
    assert "Did you mean 'identity'?" in message and "kto_en_demo" in message


def test_names_lists_entries(registry):
    assert registry.names == sorted(EXPECTED | {"alpaca_en": 0, "hh_rlhf_en": 0})


def test_paths_resolve_as_given_or_under_dataset_dir(registry, tmp_path):
    path = write(tmp_path / "mine.jsonl", '{"messages": [{"role": "user", "content": "q"}, '
                                          '{"role": "assistant", "content": "a"}]}\n')
    assert registry.resolve(str(path)).formatting == "openai"
    assert registry.resolve("c4_demo.jsonl").files == [FIXTURES / "c4_demo.jsonl"]


def test_registry_without_dataset_info_takes_paths_only(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "hello"}\n')
    registry = DatasetRegistry(tmp_path)
    assert registry.names == [] and registry.resolve("d.jsonl").formatting == "text"
    with pytest.raises(DataError, match="there is no dataset_info.json"):
        registry.resolve("identity")


def test_entry_with_missing_file_or_bad_info(tmp_path):
    shutil.copy(FIXTURES / "dataset_info.json", tmp_path / "dataset_info.json")
    with pytest.raises(DataError, match=r"file_name 'identity.json' does not exist"):
        DatasetRegistry(tmp_path).resolve("identity")
    write(tmp_path / "dataset_info.json", '{\n  "a": {"file_name": "x.json"},\n  "b": {\n}')
    with pytest.raises(DataError, match=r"dataset_info.json: invalid JSON: .* line 4, column 2"):
        DatasetRegistry(tmp_path)


def test_entry_without_file_or_hub(tmp_path):
    write(tmp_path / "dataset_info.json", '{"x": {"formatting": "sharegpt"}}')
    with pytest.raises(DataError, match=r"dataset 'x' has no \"file_name\""):
        DatasetRegistry(tmp_path).resolve("x")


def test_raw_row_origin():
    assert RawRow({}, "f.jsonl", 7, 3).origin == "f.jsonl:7"
    assert RawRow({}, "f.json", None, 3).origin == "f.json#3"


# --------------------------------------------------------------------------- datasets-backed sources


def table_rows(path: Path, work: Path) -> list[RawRow]:
    """The rows of one file as the cached pipeline reads them (datasets builder + row format)."""
    from tunelab.data.tables import Source

    table, row_format = Source(path=path).table(work)
    return [row for row in row_format.decode(table[:], range(len(table))) if row is not None]


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir()
                                         if p.suffix in (".json", ".jsonl", ".csv", ".txt") and p.name != INFO_FILE))
def test_datasets_reads_every_fixture_like_read_rows(tmp_path, name):
    expected = list(read_rows(FIXTURES / name))
    got = table_rows(FIXTURES / name, tmp_path)
    assert [row.data for row in got] == [row.data for row in expected]
    assert [row.line for row in got] == [row.line if name.endswith((".jsonl", ".txt")) else None
                                         for row in expected]  # csv lines are found when an error names one


def test_mixed_field_types_and_odd_json_layouts_still_read(tmp_path):
    mixed = write(tmp_path / "mixed.json", json.dumps([{"output": "a", "history": [["u", "b"]]},
                                                       {"output": ["c", "d"], "history": None}]))
    assert [row.data for row in table_rows(mixed, tmp_path)] == [{"output": "a", "history": [["u", "b"]]},
                                                                 {"output": ["c", "d"]}]
    lines = write(tmp_path / "lines.json", '\ufeff{"a": 1}\n\n{"a": [2]}\n')
    assert [(row.line, row.data) for row in table_rows(lines, tmp_path)] == [(1, {"a": 1}), (3, {"a": [2]})]
    pretty = write(tmp_path / "pretty.json", '{\n  "a": 1\n}\n')
    assert [row.data for row in table_rows(pretty, tmp_path)] == [{"a": 1}]


def test_csv_cells_stay_strings(tmp_path):
    path = write(tmp_path / "d.csv", "instruction,output,label\nadd 2 and 2,4,true\nempty,,\n")
    assert [row.data for row in table_rows(path, tmp_path)] == [row.data for row in read_rows(path)] == [
        {"instruction": "add 2 and 2", "output": "4", "label": "true"},
        {"instruction": "empty", "output": "", "label": ""}]


def test_bom_and_crlf_lines_read_alike(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
    assert [(r.line, r.data) for r in read_rows(path)] == [(1, {"a": 1}), (2, {"a": 2})]
    assert [(r.line, r.data) for r in table_rows(path, tmp_path)] == [(1, {"a": 1}), (2, {"a": 2})]


def test_saved_dataset_directories_resolve_and_read_their_split(tmp_path):
    import datasets

    rows = {"conversations": [[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "plain"))
    plain = DatasetRegistry(tmp_path).resolve("plain")
    assert plain.formatting == "text" and [r.data["text"] for r in plain.rows()] == ["one", "two"]
    write(tmp_path / "dataset_info.json", json.dumps({"chat": {"file_name": "dict", "formatting": "sharegpt",
                                                               "split": "test"},
                                                      "wrong": {"file_name": "dict", "formatting": "sharegpt"}}))
    records, _ = to_records(DatasetRegistry(tmp_path).resolve("chat").rows(),
                            DatasetRegistry(tmp_path).resolve("chat"))
    assert records[0].messages == [Message("user", "q"), Message("assistant", "a")]
    with pytest.raises(DataError, match=r"the saved dataset has no split 'train' \(it has test\)"):
        list(DatasetRegistry(tmp_path).resolve("wrong").rows())


def test_decode_utf8_names_line_and_column_in_a_document():
    from tunelab.data.sources import decode_utf8

    with pytest.raises(DataError, match=r"file f.json, line 2: invalid UTF-8: byte 0xff at column 3"):
        decode_utf8(b'[\n  \xff]', "f.json")
    assert decode_utf8(b"\xef\xbb\xbfok", "f") == "ok"


def test_repo_like_names_only_go_to_the_hub_when_nothing_local_matches(tmp_path):
    from tunelab.data.sources import looks_like_repo

    assert looks_like_repo("org/name") and looks_like_repo("llamafactory/alpaca_en")
    assert not looks_like_repo("data/train.jsonl") and not looks_like_repo("name") and not looks_like_repo("a/b/c")
