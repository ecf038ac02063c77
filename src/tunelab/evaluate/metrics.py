"""Scores for generated text: corpus BLEU, ROUGE-1/2/L F1 and normalised exact match.

The metrics come from the libraries people cite them from (``sacrebleu``, ``rouge-score``),
so numbers are comparable with published ones. What this module adds is language handling:

- BLEU uses sacrebleu's ``zh`` tokenizer when the references contain CJK characters (the
  default ``13a`` tokenizer would treat a whole Chinese sentence as one word).
- rouge-score's tokenizer keeps only ``[a-z0-9]`` runs, so Chinese or Japanese text scores 0
  whatever the model writes. Text containing CJK characters is segmented into words with
  ``jieba`` instead and fed to rouge-score as those words.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any, Sequence

# CJK Unified Ideographs (+ extension A, compatibility), Hiragana/Katakana, Hangul syllables.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_SPACES = re.compile(r"\s+")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def contains_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Strip, casefold, collapse whitespace and drop trailing punctuation ("Paris." == "paris")."""
    text = _SPACES.sub(" ", text.strip().casefold())
    end = len(text)
    while end and (_is_punctuation(text[end - 1]) or text[end - 1] == " "):
        end -= 1
    return text[:end]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions equal to their reference after :func:`normalize_answer`."""
    _check_lengths(predictions, references)
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(predictions)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100), tokenized with ``zh`` when the references contain CJK.

    Corpus BLEU pools n-gram counts over all sentences; without smoothing a corpus whose
    sentences are all shorter than four tokens scores 0, as in the original definition.
    """
    from sacrebleu.metrics import BLEU

    _check_lengths(predictions, references)
    tokenize = "zh" if any(contains_cjk(r) for r in references) else "13a"
    return float(BLEU(tokenize=tokenize).corpus_score(list(predictions), [list(references)]).score)


class _WordTokenizer:
    """rouge-score tokenizer for CJK text: jieba words, lower-cased, punctuation and spaces dropped."""

    def tokenize(self, text: str) -> list[str]:
        return [word.lower() for word in _jieba().lcut(text) if any(c.isalnum() for c in word)]


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # it logs dictionary loading at INFO on first use
    return jieba


@lru_cache(maxsize=2)
def _rouge_scorer(cjk: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_WordTokenizer() if cjk else None)


def rouge_pair(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 (0-1) of one pair; jieba words when either side contains CJK characters."""
    scorer = _rouge_scorer(contains_cjk(prediction) or contains_cjk(reference))
    scores = scorer.score(reference, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the pairs, as percentages."""
    _check_lengths(predictions, references)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, value in rouge_pair(prediction, reference).items():
            totals[name] += value
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every generation metric for a corpus: bleu, rouge1, rouge2, rougeL, exact_match (0-100)."""
    return {"bleu": corpus_bleu(predictions, references), **rouge(predictions, references),
            "exact_match": exact_match(predictions, references)}


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one reference per prediction and at least one pair; got {len(predictions)} "
                         f"predictions and {len(references)} references")
