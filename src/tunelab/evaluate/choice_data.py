"""Reading multiple-choice benchmarks from the CSV files users already have.

Accepted layouts (MMLU, C-Eval, CMMLU and home-made sets alike):

- one CSV, or a directory of CSVs searched recursively (one subject per file, named after
  the file; a ``subject`` column, when present, overrides that name per row);
- a header naming ``question``, the option columns ``A``, ``B``, ... and ``answer`` in any
  case and order, other columns ignored (C-Eval's ``id``/``explanation``, CMMLU's unnamed
  index; a file without ``answer`` column has no answers); or no header and exactly MMLU's
  six columns ``question,A,B,C,D,answer``;
- C-Eval-style names ``<subject>_dev.csv`` / ``_val.csv`` / ``_test.csv``: dev files are the
  pool of few-shot examples and are never scored. When a subject has several scored
  splits, ``test`` is scored (the split benchmarks report), else ``val``; a test file
  without any answers (C-Eval keeps them secret) counts as absent, so C-Eval's directory
  scores its val split.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import DataError

LETTERS = "ABCDEFGHIJ"
_SPLITS = ("dev", "val", "test")
_SCORED_PREFERENCE = ("test", "val", "")  # "" = a file without a split suffix
_MMLU_COLUMNS = ["question", "a", "b", "c", "d", "answer"]


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    options: tuple[str, ...]
    answer: str  # a letter, "" when the file gives none
    file: str
    line: int


@dataclass
class ChoiceData:
    """Questions to score and few-shot pools (dev files), by subject."""

    scored: dict[str, list[Question]] = field(default_factory=dict)
    dev: dict[str, list[Question]] = field(default_factory=dict)


def subject_and_split(path: Path) -> tuple[str, str]:
    """``computer_network_val.csv`` -> ("computer_network", "val"); no suffix -> (stem, "")."""
    stem = path.stem
    for split in _SPLITS:
        if stem.endswith(f"_{split}"):
            return stem[: -len(split) - 1], split
    return stem, ""


def _header_columns(row: list[str], file: str, line: int) -> dict[str, int] | None:
    """Column index by role (question, answer, subject, option letters); None when ``row`` is data."""
    names = [cell.strip().lower() for cell in row]
    if "question" not in names:
        return None  # answer may be missing: C-Eval's test files have no answer column
    columns = {name: names.index(name) for name in ("question", "answer", "subject") if name in names}
    for letter in LETTERS:
        if letter.lower() not in names:
            break
        columns[letter] = names.index(letter.lower())
    if "B" not in columns:
        raise DataError("the header names no option columns A, B, ...; a multiple-choice file needs the columns "
                        "question, A, B, C, D, answer.", file=file, line=line)
    return columns


def _mmlu_columns(row: list[str], file: str, line: int) -> dict[str, int]:
    if len(row) != len(_MMLU_COLUMNS):
        raise DataError(f"the first row is neither a header naming the columns question, A, B, C, D, answer nor an "
                        f"MMLU-style row without header (6 cells); it has {len(row)} cells.", file=file, line=line,
                        hint="Add a header row: question,A,B,C,D,answer (optionally subject).")
    return {"question": 0, "A": 1, "B": 2, "C": 3, "D": 4, "answer": 5}


def _cell(row: list[str], columns: dict[str, int], role: str, file: str, line: int) -> str:
    index = columns[role]
    if index >= len(row):
        raise DataError(f"the row has {len(row)} cells, so column '{role}' (cell {index + 1}) is missing.",
                        file=file, line=line, field=role, hint="Check for a missing comma or unbalanced quotes.")
    return row[index].strip()


def _question(row: list[str], columns: dict[str, int], subject: str, file: str, line: int) -> Question:
    letters = [letter for letter in LETTERS if letter in columns]
    roles = sorted((role for role in ("question", "answer", *letters) if role in columns), key=columns.__getitem__)
    cells = {role: _cell(row, columns, role, file, line) for role in roles}  # the first missing cell is named
    cells.setdefault("answer", "")
    if not cells["question"]:
        raise DataError("the question is empty.", file=file, line=line, field="question")
    answer = cells["answer"].upper()
    if answer and answer not in letters:
        raise DataError(f"answer {cells['answer']!r} is not one of the option letters {', '.join(letters)}.",
                        file=file, line=line, field="answer")
    row_subject = _cell(row, columns, "subject", file, line) if "subject" in columns else ""
    return Question(row_subject or subject, cells["question"], tuple(cells[letter] for letter in letters), answer,
                    file, line)


def read_choice_csv(path: Path, subject: str) -> list[Question]:
    """Every question of one CSV file; ``subject`` names rows that have no subject column."""
    file, line = str(path), 1
    questions: list[Question] = []
    columns: dict[str, int] | None = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            for row in reader:
                start, line = line, reader.line_num + 1  # a quoted cell may span lines: report the first
                if not any(cell.strip() for cell in row):
                    continue
                if columns is None:
                    columns = _header_columns(row, file, start)
                    if columns is not None:
                        continue
                    columns = _mmlu_columns(row, file, start)
                questions.append(_question(row, columns, subject, file, start))
    except UnicodeDecodeError as err:
        raise DataError(f"the file is not UTF-8 text ({err.reason} at byte {err.start}).", file=file,
                        hint="Re-save it as UTF-8 CSV.") from None
    except csv.Error as err:
        raise DataError(f"not valid CSV: {err}.", file=file, line=line) from None
    return questions


def _csv_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.csv"))
        if files:
            return files
        raise DataError("the directory holds no .csv files.", file=str(path),
                        hint="Point --data at a CSV file or a directory of per-subject CSV files.")
    raise DataError("no such file or directory.", file=str(path))


def _require_answers(questions: list[Question]) -> None:
    for question in questions:
        if not question.answer:
            raise DataError("the answer is empty.", file=question.file, line=question.line, field="answer",
                            hint="Every scored or few-shot question needs its answer letter.")


def _scored_split(splits: dict[str, list[Question]]) -> list[Question]:
    """The split to score: test, else val, else unsuffixed files; an answerless test split is skipped."""
    for split in _SCORED_PREFERENCE:
        questions = splits.get(split, [])
        if split == "test" and not any(q.answer for q in questions):
            continue
        if questions:
            return questions
    return []


def load_choice_data(path: str | Path) -> ChoiceData:
    """Read a benchmark file or directory into questions to score and few-shot pools by subject."""
    by_subject: dict[str, dict[str, list[Question]]] = defaultdict(lambda: defaultdict(list))
    for file in _csv_files(Path(path)):
        subject, split = subject_and_split(file)
        for question in read_choice_csv(file, subject):
            by_subject[question.subject][split].append(question)
    data = ChoiceData()
    for subject, splits in sorted(by_subject.items()):
        scored = _scored_split(splits)
        _require_answers(scored)
        _require_answers(splits.get("dev", []))
        if scored:
            data.scored[subject] = scored
        if splits.get("dev"):
            data.dev[subject] = splits["dev"]
    if not data.scored:
        raise DataError("no questions to score: every CSV is a *_dev.csv few-shot file or empty.", file=str(path),
                        hint="Add the val or test files next to the dev files.")
    return data
