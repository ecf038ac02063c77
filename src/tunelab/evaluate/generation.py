"""Generation quality: answer every prompt of a dataset and score against its reference.

Prompts and references come from :func:`tunelab.predict.prompts_and_references` (any SFT,
preference or KTO file) and answers from :func:`tunelab.inference.generate`, so the model
is prompted exactly as ``tunelab predict`` and ``chat`` prompt it. Decoding is greedy:
scores then depend on the model alone, not on a sampling seed, and base and tuned columns
are comparable.
"""

from __future__ import annotations

from tunelab.data.records import Message
from tunelab.errors import DataError
from tunelab.evaluate.metrics import generation_scores
from tunelab.evaluate.report import TaskResult
from tunelab.inference import GenerationOptions, LoadedRun
from tunelab.predict import predict_records

Pairs = list[tuple[list[Message], str | None]]


def check_references(pairs: Pairs, data: str) -> None:
    """Fail before any generation when nothing could be scored."""
    if not any(reference is not None for _, reference in pairs):
        raise DataError("no record has a reference answer to score predictions against.", file=data,
                        hint="Generation eval needs conversations that end with an assistant answer "
                             "(or preference data, whose chosen answer is the reference).")


def generation_eval(loaded: LoadedRun, pairs: Pairs, batch_size: int, max_new_tokens: int) -> TaskResult:
    """Greedy answers for ``pairs``; BLEU/ROUGE/exact match over the records that have a reference."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0, do_sample=False)
    rows = list(predict_records(loaded, pairs, options, batch_size))
    scored = [row for row in rows if row["reference"] is not None]
    metrics = generation_scores([row["prediction"] for row in scored], [row["reference"] for row in scored])
    return TaskResult({**metrics, "samples": len(scored)}, rows)
