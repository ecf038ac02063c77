"""Write examples/data/arith.json and arith_eval.json: the verifiable task of the GRPO example.

Small additions and subtractions ("What is 7 + 5? Reply with just the number."), each with
its answer in a ``solution`` column, which reward functions receive as the keyword
``solution`` and the built-in ``accuracy`` checks against. The registry maps ``solution``
as the alpaca response too, so the same file trains an SFT run of the same length (the
memory baseline of benchmarks/grpo_smollm2.py).

Deterministic (seeded) and rerunnable: ``python examples/grpo_make_data.py``. Train and
eval share no question.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN, EVAL, SEED = 150, 40, 16
PHRASINGS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}.")
SUFFIX = " Reply with just the number."


def _questions(rng: random.Random) -> list[dict[str, str]]:
    """Every question of the task: one-digit sums and differences (never negative), and
    two-digit plus one-digit sums, each in a random phrasing."""
    problems = [(a, "+", b) for a in range(1, 10) for b in range(1, 10)]
    problems += [(a, "-", b) for a in range(2, 10) for b in range(1, a)]
    problems += [(a, "+", b) for a in range(10, 30, 2) for b in range(2, 10)]
    records = []
    for a, op, b in problems:
        answer = a + b if op == "+" else a - b
        text = rng.choice(PHRASINGS).format(a=a, op=op, b=b) + SUFFIX
        records.append({"instruction": text, "solution": str(answer)})
    rng.shuffle(records)
    return records


def main() -> None:
    records = _questions(random.Random(SEED))
    if len(records) < TRAIN + EVAL:
        sys.exit(f"only {len(records)} distinct questions for {TRAIN} + {EVAL}")
    for name, part in (("arith.json", records[:TRAIN]), ("arith_eval.json", records[TRAIN:TRAIN + EVAL])):
        text = json.dumps(part, indent=2, ensure_ascii=False) + "\n"
        (DATA_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {len(part)} questions to {DATA_DIR / name}")


if __name__ == "__main__":
    main()
