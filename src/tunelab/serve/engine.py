"""The generation engine: one worker thread owns the model, requests wait in a queue.

Why one thread: the served runs share one module whose active adapter is global state
(``set_adapter``), so two generations at once could run with each other's adapter. The
worker is the only code that switches adapters and generates, one batch at a time, and
every batch is for a single model id, so requests can never leak into each other.

Batching: the worker takes the oldest queued job, then every other queued job for the same
model id whose sampling settings agree (:func:`~tunelab.inference.sampling_key`), up to
``max_batch_size`` sequences, and generates them as one left-padded batch in which each
row keeps its own ``max_tokens`` and stop strings. Streaming jobs and seeded jobs run
alone (a stream is read token by token; a seed must give the same answer whatever else is
queued).

The worker never waits on a client: results and streamed text are handed to callbacks
that only enqueue (the HTTP layer moves them onto the request's asyncio queue).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tunelab.errors import TunelabError
from tunelab.inference import Completion, GenerationRow, LoadedRun, sampling_key

log = logging.getLogger("tunelab.serve")


@dataclass
class ServedModel:
    """One model id: how its prompts are rendered and tokenized, and where it comes from.

    ``run`` holds the tokenizer, template and config the run was trained with; with the
    transformers backend ``run.model`` is also what generates (the shared module for
    adapters and the base).
    """

    id: str
    run: LoadedRun
    source: str  # run directory or base model, for /v1/models and logs
    parent: str | None  # the base model's id for runs; None for the base itself
    context_length: int | None  # max_position_embeddings; None when the config has none
    activate: Callable[[], AbstractContextManager[Any]]  # selects this model on a shared module

    def __post_init__(self) -> None:
        # Encode once now: a fast tokenizer saved with padding or truncation switched on resets
        # that state on its first unpadded call, and doing so while another request thread
        # encodes fails with "Already borrowed". Afterwards concurrent encoding only reads.
        self.run.tokenizer("warm-up", add_special_tokens=False)


class Backend(Protocol):
    """What generates: the transformers backend, or vLLM."""

    models: dict[str, ServedModel]

    def run(self, model: ServedModel, rows: list[GenerationRow]) -> list[Completion]:
        """Generate ``rows`` (one batch, one model id)."""


class EngineClosed(TunelabError):
    """The server is shutting down and accepts no new requests."""


@dataclass
class Job:
    """One request: its rows (choices) and where its result goes."""

    model_id: str
    rows: list[GenerationRow]
    on_done: Callable[[list[Completion] | BaseException], None]  # called once, from the worker thread
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        for row in self.rows:
            row.cancelled = self.cancelled

    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys may share a batch; None: this job runs alone."""
        options = self.rows[0].options
        if self.stream or options.seed is not None:
            return None
        return (self.model_id, sampling_key(options))


class Engine:
    """The request queue and the worker thread that drains it."""

    def __init__(self, backend: Backend, max_batch_size: int = 8):
        if max_batch_size < 1:
            raise TunelabError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.backend.models

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (not counting the batch being generated)."""
        with self._cond:
            return len(self._pending)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker (again, after :meth:`stop`); a running engine is left as is."""
        with self._cond:
            if self._worker is not None and self._worker.is_alive():
                return
            self._closing = False
            self._worker = threading.Thread(target=self._loop, name="tunelab-serve-worker", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        """Refuse new jobs, finish every queued one, then end the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join()

    # -- requests -----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if job.model_id not in self.models:
            raise KeyError(job.model_id)
        with self._cond:
            if self._closing or self._worker is None:
                raise EngineClosed("the server is shutting down and accepts no new requests.")
            self._pending.append(job)
            self._cond.notify()

    # -- worker -------------------------------------------------------------------------
    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._execute(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job plus compatible queued ones; None once closing with nothing queued."""
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            batch, size, key = [first], len(first.rows), first.batch_key()
            if key is not None:
                for job in list(self._pending):
                    if job.batch_key() == key and size + len(job.rows) <= self.max_batch_size:
                        self._pending.remove(job)
                        batch.append(job)
                        size += len(job.rows)
            return batch

    def _execute(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.cancelled.is_set()]
        if not live:
            return
        rows = [row for job in live for row in job.rows]
        try:
            results = self.backend.run(self.models[live[0].model_id], rows)
        except Exception as err:  # reported to the waiting requests; the worker keeps serving
            log.exception("generation failed for model '%s' (%d request(s))", live[0].model_id, len(live))
            for job in live:
                job.on_done(err)
            return
        start = 0
        for job in live:
            job.on_done(results[start:start + len(job.rows)])
            start += len(job.rows)
