"""Chat with runs and their base model, streamed, one base module in memory.

The serving engine does the work (:mod:`tunelab.serve`): the chosen runs are planned
together, so runs trained on one base share one module with each run's adapter under its
own name, and the base itself is that module with the adapters switched off. A single
worker thread owns the module, so two browser tabs chatting at once never generate with
each other's adapter. Choosing runs outside the loaded set loads a new engine in place
of the old one.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

from tunelab.data.records import Message
from tunelab.errors import TunelabError
from tunelab.inference import GenerationOptions, GenerationRow, encode_prompt
from tunelab.serve.engine import Engine, Job, ServedModel

#: The choice that means "the base model the run was trained from".
BASE = "base"


class ChatService:
    """Loads runs on demand and streams answers."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir).resolve()
        self._engine: Engine | None = None
        self._loaded: frozenset[Path] = frozenset()
        self._lock = threading.Lock()

    def _engine_for(self, runs: list[Path]) -> Engine:
        from tunelab.serve.app import build_engine

        wanted = frozenset(runs)
        with self._lock:
            if self._engine is None or not wanted <= self._loaded:
                if self._engine is not None:
                    self._engine.stop()
                self._engine = build_engine([str(path) for path in sorted(wanted)])
                self._engine.start()
                self._loaded = wanted
            return self._engine

    def _model(self, engine: Engine, run: Path, choice: str) -> ServedModel:
        """The served model for ``choice``: a run id, or :data:`BASE` for ``run``'s base."""
        source = str(run.resolve())
        for model in engine.models.values():
            if choice == BASE and model.parent is None:
                return model
            if choice != BASE and model.source == str((self.runs_dir / choice).resolve()):
                return model
        raise TunelabError(f"'{choice}' is not loaded for chat with {source}.")

    def stream(self, run_id: str, choice: str, messages: list[Message], options: GenerationOptions,
               ) -> Iterator[str]:
        """The answer of ``choice`` (``run_id`` itself, another run on its base, or :data:`BASE`) as it grows."""
        run = self.runs_dir / run_id
        runs = [run] + ([self.runs_dir / choice] if choice not in (BASE, run_id) else [])
        engine = self._engine_for(runs)
        model = self._model(engine, run, choice)
        pieces: queue.Queue[str | list | BaseException] = queue.Queue()
        row = GenerationRow(encode_prompt(model.run, messages), options, on_text=pieces.put)
        job = Job(model.id, [row], on_done=pieces.put, stream=True)
        engine.submit(job)
        try:
            while isinstance(piece := pieces.get(), str):
                yield piece
        finally:  # the browser went away mid-answer: stop generating for nobody
            job.cancelled.set()
        if isinstance(piece, BaseException):
            raise piece
