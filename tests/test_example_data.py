"""Checks on the hand-written datasets in examples/data.

These files are what a user trains on first, so a broken record, a registry entry pointing
at a missing file or an identity answer that forgets the assistant's name would show up as
a confusing failure far from its cause. The checks use only json/csv (not tunelab's own
readers) so they hold the data to LLaMA-Factory's published layouts, independently of our
implementation.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "examples" / "data"

ALPACA_FILES = {"identity.json": 90, "identity_eval.json": 15, "alpaca_demo.json": 40,
                "ppo_prompts.json": 48, "gen_eval.json": 20}
PAIR_FILES = {"pairs.json": 60, "pairs_eval.json": 16}
LLAMAFACTORY_KEYS = {"file_name", "formatting", "ranking", "columns", "tags"}
ALPACA_KEYS = {"instruction", "input", "output"}
MC_HEADER = ["question", "A", "B", "C", "D", "answer", "subject"]
CJK = re.compile(r"[\u4e00-\u9fff]")
# Words that only occur in the French/Spanish/German/Chinese identity answers.
NON_ENGLISH_ANSWER = re.compile(r"\b(avec|con|mit)\b|用")


def load_json(name: str) -> Any:
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


def load_csv(name: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(DATA_DIR / name, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def normalise(text: str) -> str:
    """Case- and space-insensitive key, so near-identical prompts count as duplicates."""
    return " ".join(text.lower().split())


def duplicates(texts: list[str]) -> list[str]:
    return [text for text, n in Counter(map(normalise, texts)).items() if n > 1]


def pair_prompts(name: str) -> list[str]:
    return [record["conversations"][-1]["value"] for record in load_json(name)]


# --- every JSON file -----------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(DATA_DIR.glob("*.json")), ids=lambda p: p.name)
def test_json_is_pretty_printed_utf8(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"


# --- the registry --------------------------------------------------------------------

def test_registry_names_every_dataset_with_llamafactory_keys_only() -> None:
    info = load_json("dataset_info.json")
    assert set(info) == {"identity", "identity_eval", "alpaca_demo", "sharegpt_demo", "pairs",
                         "pairs_eval", "kto_demo", "ppo_prompts", "pretrain_text", "gen_eval",
                         "identity2", "identity2_eval", "arith", "arith_eval", "tools_demo"}
    for name, entry in info.items():
        assert set(entry) <= LLAMAFACTORY_KEYS, name
        assert (DATA_DIR / entry["file_name"]).is_file(), name
        assert entry.get("formatting", "alpaca") in {"alpaca", "sharegpt"}, name


def test_every_data_file_is_registered_or_a_csv() -> None:
    registered = {entry["file_name"] for entry in load_json("dataset_info.json").values()}
    on_disk = {p.name for p in DATA_DIR.iterdir() if p.suffix in {".json", ".txt"}}
    assert on_disk - {"dataset_info.json"} == registered


@pytest.mark.parametrize("name", [n for n, e in load_json("dataset_info.json").items()
                                  if e["file_name"].endswith(".json")])
def test_registry_columns_exist_in_every_record(name: str) -> None:
    entry = load_json("dataset_info.json")[name]
    for index, record in enumerate(load_json(entry["file_name"])):
        missing = set(entry["columns"].values()) - set(record)
        assert not missing, f"{entry['file_name']} record {index} lacks {missing}"


def test_ranking_entries_are_the_pair_files() -> None:
    info = load_json("dataset_info.json")
    ranked = {e["file_name"] for e in info.values() if e.get("ranking")}
    assert ranked == set(PAIR_FILES)
    for entry in info.values():
        if entry.get("ranking"):
            assert {"chosen", "rejected"} <= set(entry["columns"])


def test_kto_entry_maps_kto_tag_to_label_with_role_content_tags() -> None:
    entry = load_json("dataset_info.json")["kto_demo"]
    assert entry["columns"] == {"messages": "messages", "kto_tag": "label"}
    assert entry["tags"]["role_tag"] == "role" and entry["tags"]["content_tag"] == "content"


# --- alpaca files --------------------------------------------------------------------

@pytest.mark.parametrize("name,count", sorted(ALPACA_FILES.items()))
def test_alpaca_records(name: str, count: int) -> None:
    records = load_json(name)
    assert len(records) == count
    for index, record in enumerate(records):
        assert set(record) == ALPACA_KEYS, f"{name} record {index}"
        assert all(isinstance(record[key], str) for key in ALPACA_KEYS), f"{name} record {index}"
        assert record["instruction"].strip(), f"{name} record {index}"
        # PPO prompts carry no answer; every other file needs one.
        assert bool(record["output"].strip()) == (name != "ppo_prompts.json"), f"{name} record {index}"
    assert duplicates([r["instruction"] for r in records]) == []


@pytest.mark.parametrize("name", ["identity.json", "identity_eval.json"])
def test_identity_answers_name_tuna_and_tunelab_briefly(name: str) -> None:
    for index, record in enumerate(load_json(name)):
        answer = record["output"]
        assert "Tuna" in answer and "tunelab" in answer, f"{name} record {index}: {answer}"
        assert len(answer) <= 200, f"{name} record {index} is not a short answer"


def test_identity_has_about_ten_non_english_questions_answered_in_kind() -> None:
    records = load_json("identity.json")
    foreign = [r for r in records if NON_ENGLISH_ANSWER.search(r["output"])]
    assert 10 <= len(foreign) <= 12
    assert sum(bool(CJK.search(r["instruction"])) for r in foreign) >= 2


def test_identity_eval_is_held_out() -> None:
    train = {normalise(r["instruction"]) for r in load_json("identity.json")}
    held_out = {normalise(r["instruction"]) for r in load_json("identity_eval.json")}
    assert train.isdisjoint(held_out)


def test_gen_eval_has_three_chinese_items_and_short_references() -> None:
    records = load_json("gen_eval.json")
    assert sum(bool(CJK.search(r["instruction"])) for r in records) == 3
    assert all(len(r["output"]) <= 100 for r in records)


# --- sharegpt conversations ----------------------------------------------------------

def test_sharegpt_demo_alternates_human_and_gpt() -> None:
    records = load_json("sharegpt_demo.json")
    assert len(records) == 20
    for index, record in enumerate(records):
        turns = record["conversations"]
        assert all(set(t) == {"from", "value"} and t["value"].strip() for t in turns), index
        roles = [t["from"] for t in turns]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["human", "gpt"] * (len(roles) // 2), f"record {index}: {roles}"
        assert 2 <= len(roles) // 2 <= 3, f"record {index} has {len(roles) // 2} user turns"


# --- preference data -----------------------------------------------------------------

@pytest.mark.parametrize("name,count", sorted(PAIR_FILES.items()))
def test_pairs_layout_and_learnable_marker(name: str, count: int) -> None:
    records = load_json(name)
    assert len(records) == count
    for index, record in enumerate(records):
        where = f"{name} record {index}"
        assert set(record) == {"conversations", "chosen", "rejected"}, where
        assert [t["from"] for t in record["conversations"]] == ["human"], where
        chosen, rejected = record["chosen"], record["rejected"]
        assert chosen["from"] == rejected["from"] == "gpt", where
        assert normalise(chosen["value"]) != normalise(rejected["value"]), where
        # The style signal a small reward model should pick up: a friendly closing.
        assert chosen["value"].endswith("!") and not rejected["value"].endswith("!"), where
        assert len(chosen["value"]) > len(rejected["value"]), where
    assert duplicates(pair_prompts(name)) == []


def test_pairs_eval_prompts_are_held_out() -> None:
    train = set(map(normalise, pair_prompts("pairs.json")))
    assert train.isdisjoint(map(normalise, pair_prompts("pairs_eval.json")))


def test_kto_records_have_user_assistant_messages_and_balanced_labels() -> None:
    records = load_json("kto.json")
    assert len(records) == 40
    for index, record in enumerate(records):
        assert set(record) == {"messages", "label"}, index
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"], index
        assert isinstance(record["label"], bool), index
        # Same style signal as the pairs: desirable answers end with a friendly closing.
        assert record["messages"][-1]["content"].endswith("!") == record["label"], index
    assert Counter(r["label"] for r in records) == {True: 20, False: 20}
    assert duplicates([r["messages"][0]["content"] for r in records]) == []


# --- plain text ----------------------------------------------------------------------

def test_pretrain_text_is_one_paragraph_per_line() -> None:
    text = (DATA_DIR / "pretrain.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert text.endswith("\n") and 140 <= len(lines) <= 160
    assert all(len(line) >= 80 and line == line.strip() for line in lines)
    assert duplicates(lines) == []
    assert sum("Veloria" in line or "Velorian" in line for line in lines) >= 50


# --- multiple choice -----------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("mc_demo.csv", 40), ("mc_dev.csv", 5)])
def test_multiple_choice_rows(name: str, count: int) -> None:
    header, rows = load_csv(name)
    assert header == MC_HEADER
    assert len(rows) == count
    for index, row in enumerate(rows, start=2):  # line 1 is the header
        assert row["answer"] in {"A", "B", "C", "D"}, f"{name} line {index}"
        options = [row[letter] for letter in "ABCD"]
        assert all(options) and len(set(options)) == 4, f"{name} line {index}"
        assert row["question"].strip() and row["subject"], f"{name} line {index}"


def test_mc_demo_is_balanced_across_subjects_and_letters() -> None:
    _, rows = load_csv("mc_demo.csv")
    assert Counter(r["subject"] for r in rows) == {
        "geography": 10, "arithmetic": 10, "science": 10, "language": 10}
    assert Counter(r["answer"] for r in rows) == {"A": 10, "B": 10, "C": 10, "D": 10}
    assert duplicates([r["question"] for r in rows]) == []


def test_mc_dev_shots_are_not_test_questions() -> None:
    _, demo = load_csv("mc_demo.csv")
    _, dev = load_csv("mc_dev.csv")
    subjects = {r["subject"] for r in demo}
    assert {r["subject"] for r in dev} <= subjects
    assert {normalise(r["question"]) for r in dev}.isdisjoint(normalise(r["question"]) for r in demo)
