"""After training: perplexity, generation metrics (BLEU/ROUGE/exact match), multiple choice,
and base-vs-tuned comparison. ``tunelab eval`` calls :func:`eval_main`."""

from tunelab.evaluate.runner import eval_main

__all__ = ["eval_main"]
