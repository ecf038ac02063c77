"""How to generate an answer: declared once for chat, predict, eval, the server and the web UI.

Each field carries its command-line help, so ``tunelab chat`` and ``tunelab predict`` build
their flags from this class (:func:`tunelab.cli._generation_options`) and a new option
appears everywhere at once. The server's OpenAI request fields map onto the same fields
(``max_tokens`` -> ``max_new_tokens``; ``temperature``, ``top_p``, ``stop`` and ``seed``
by name). This module imports nothing heavy: the CLI reads it at startup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError


def _option(default: Any, help: str, flag: str | None = None) -> Any:
    """A field with its command-line help (and flag spelling, when not ``--field-name``)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class GenerationOptions:
    """Decoding settings of one answer (or of every answer of a batch)."""

    max_new_tokens: int = _option(256, "Most tokens to generate.")
    temperature: float = _option(0.7, "Sampling temperature; 0 = greedy.")
    top_p: float = _option(1.0, "Nucleus sampling: draw among the most likely tokens holding this much "
                                "probability.")
    top_k: int = _option(50, "Draw among the k most likely tokens (0 = no limit).")
    repetition_penalty: float = _option(1.0, ">1 discourages repeating tokens.")
    num_beams: int = _option(1, "Beam search width (1 = no beam search). Beam search answers at the end, "
                                "so it does not stream.")
    do_sample: bool | None = _option(None, "Force sampling or greedy decoding (default: sample when "
                                           "temperature > 0).", flag="--do-sample/--greedy")
    seed: int | None = _option(None, "Random seed for sampling.")
    stop: list[str] = field(default_factory=list, metadata={
        "help": "End the answer where this text appears (not included). Repeat for several.", "flag": None})

    def __post_init__(self) -> None:
        problems = [message for bad, message in (
            (self.max_new_tokens < 1, f"max_new_tokens must be at least 1 (got {self.max_new_tokens})"),
            (self.temperature < 0, f"temperature must be >= 0 (got {self.temperature})"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k < 0, f"top_k must be >= 0 (got {self.top_k})"),
            (self.repetition_penalty <= 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
            (self.num_beams < 1, f"num_beams must be at least 1 (got {self.num_beams})"),
            (any(not text for text in self.stop), "a stop string must not be empty"),
        ) if bad]
        if problems:
            raise ConfigError("generation options: " + "; ".join(problems) + ".")

    @property
    def sample(self) -> bool:
        """Whether tokens are drawn at random (else the most likely one is taken)."""
        return self.do_sample if self.do_sample is not None else self.temperature > 0
