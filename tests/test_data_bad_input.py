"""Damaged data: one clear message naming the file and the line or record, quickly, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import build_config
from tunelab.data.pipeline import build_data
from tunelab.data.sources import read_rows
from tunelab.errors import DataError

GOOD = b'{"instruction": "q", "output": "a"}\n'


def config(tmp_path: Path, path: Path, **data):
    return build_config({"data": {"train": [str(path)], "template": "chatml", "cache_dir": str(tmp_path / "cache"),
                                  "num_workers": 1, **data}})


def failure(tmp_path: Path, tokenizer, path: Path, **data) -> DataError:
    with pytest.raises(DataError) as info:
        build_data(config(tmp_path, path, **data), tokenizer)
    return info.value


@pytest.mark.parametrize("name, content, line, column", [
    ("d.jsonl", GOOD + GOOD + b'{"instruction": "caf\xe9", "output": "a"}\n', 3, 21),
    ("d.json", b'[\n' + GOOD.rstrip() + b',\n{"instruction": "\xff", "output": "a"}\n]\n', 3, 18),
    ("d.csv", b'instruction,output\n"two\nlines",a\nq,caf\xe9\n', 4, 6),
    ("d.txt", b"fine text\n\nmore \xc3\x28 text\n", 3, 6),
])
def test_invalid_utf8_names_the_line_and_column(tmp_path, tokenizer, name, content, line, column):
    path = tmp_path / name
    path.write_bytes(content)
    err = failure(tmp_path, tokenizer, path, **({"dataset_dir": str(tmp_path)} if name == "d.txt" else {}))
    assert (err.file, err.line) == (str(path), line)
    assert f"file {path}, line {line}: invalid UTF-8: " in str(err) and f"at column {column}" in str(err)
    assert "iconv" in str(err)
    with pytest.raises(DataError, match=f"line {line}: invalid UTF-8"):
        list(read_rows(path))


def test_a_50_mb_line_is_refused_by_the_size_check_naming_its_line(tmp_path, tokenizer):
    """The size check refuses the record before it is rendered or tokenized (tokenizing it took 173 s and
    11.8 GiB); the message is the size check's, so the record never reached the tokenizer."""
    path = tmp_path / "d.jsonl"
    with path.open("w") as handle:
        handle.write(GOOD.decode())
        handle.write(json.dumps({"instruction": "x" * 50_000_000, "output": "a"}) + "\n")
        handle.write(GOOD.decode())
    err = failure(tmp_path, tokenizer, path)
    assert (err.file, err.line) == (str(path), 2)
    # 50M + "a" + the role names "user" and "assistant": every string of the record counts
    assert "the record holds 50,000,014 characters of text; at most 4,194,304 are accepted" in str(err)
    kept = build_data(config(tmp_path, path, on_error="skip"), tokenizer)
    assert len(kept.train) == 2 and kept.stats["skipped"] == 1


def test_a_truncated_parquet_file_is_named(tmp_path, tokenizer):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["q"] * 500, "output": ["a"] * 500}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = failure(tmp_path, tokenizer, path)
    assert str(err).startswith(f"file {path}: cannot read the parquet file: it is truncated or not a parquet file")


def test_invalid_json_line_names_line_and_column(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b'{"instruction": "q",, "output": "a"}\n')
    err = failure(tmp_path, tokenizer, path)
    assert (err.line, str(err).split(": ", 1)[1]) == (2, "invalid JSON (Expecting property name enclosed in double "
                                                          "quotes at column 21). Each line of a JSON-lines file must "
                                                          "hold one complete JSON object; fix or delete this line.")


def test_cli_prints_one_paragraph_without_traceback(tmp_path, tiny_model_dir):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b'{"instruction": "\xff", "output": "a"}\n')
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                        "data": {"train": [str(path)], "cache_dir": str(tmp_path / "cache")}}))
    result = CliRunner().invoke(app, ["data", "prepare", str(run_file)])
    assert result.exit_code == 2
    assert f"error: file {path}, line 2: invalid UTF-8: byte 0xff at column 18" in result.output
    assert "Traceback" not in result.output
