"""Generation quality: answer every prompt of a dataset and score against its reference.

Prompts and references come from :func:`tunelab.predict.prompts_and_references` (any SFT,
preference or KTO file) and answers from :func:`tunelab.inference.generate`, so the model
is prompted exactly as ``tunelab predict`` and ``chat`` prompt it. Decoding is greedy (or
beam search, ``num_beams``): scores then depend on the model alone, not on a sampling
seed, and base and tuned columns are comparable. ``stop`` strings end answers as they do
in ``chat`` and ``predict``.
"""

from __future__ import annotations

from typing import Sequence

from tunelab.errors import DataError
from tunelab.evaluate.metrics import generation_scores
from tunelab.evaluate.report import TaskResult
from tunelab.inference import GenerationOptions, LoadedRun
from tunelab.predict import Prompt, predict_records


def check_references(prompts: Sequence[Prompt], data: str) -> None:
    """Fail before any generation when nothing could be scored."""
    if not any(prompt.reference is not None for prompt in prompts):
        raise DataError("no record has a reference answer to score predictions against.", file=data,
                        hint="Generation eval needs conversations that end with an assistant answer "
                             "(or preference data, whose chosen answer is the reference).")


def eval_options(max_new_tokens: int, stop: Sequence[str] = (), num_beams: int = 1) -> GenerationOptions:
    """Deterministic decoding for scoring (greedy, or beam search); checked like every generation option."""
    return GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0, do_sample=False, stop=list(stop),
                             num_beams=num_beams)


def generation_eval(loaded: LoadedRun, prompts: Sequence[tuple], batch_size: int, max_new_tokens: int,
                    stop: Sequence[str] = (), num_beams: int = 1, progress: str | None = None) -> TaskResult:
    """Answers for ``prompts``; BLEU/ROUGE/exact match over the records that have a reference.

    ``prompts``: :class:`~tunelab.predict.Prompt` or ``(messages, reference)`` pairs;
    ``progress``: the label of a progress bar on the terminal (None: no bar).
    """
    options = eval_options(max_new_tokens, stop, num_beams)
    rows = list(predict_records(loaded, prompts, options, batch_size, progress))
    scored = [row for row in rows if row["reference"] is not None]
    metrics = generation_scores([row["prediction"] for row in scored], [row["reference"] for row in scored])
    return TaskResult({**metrics, "samples": len(scored)}, rows)
