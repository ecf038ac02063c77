"""The generation engine: one worker thread owns the model and schedules every request.

Why one thread: the served runs share one module whose active adapter is global state
(``set_adapter``), so two generations at once could run with each other's adapter. The
worker is the only code that switches adapters and generates, and every forward pass is
for a single model id, so requests can never leak into each other.

Continuous batching (backends with :meth:`Backend.lane`, i.e. transformers): each model id
has a :class:`Lane`, a running batch that advances one token per step. Between steps the
worker admits queued rows (oldest first, up to ``max_batch_size`` running rows over all
lanes, and about :data:`ADMIT_TOKENS` prompt tokens, so that a stream of newcomers slows
the running rows down but never stops them) and takes out the rows that ended or whose
client went away, so a short request joins a long one at the next step instead of
waiting for it, and a slot frees the moment its client disconnects. With several model
ids running, the lanes take steps in turn.

Whole batches (vLLM, and models a lane cannot serve, such as prompt learning): the worker
takes the oldest queued job plus every queued job for the same model id whose sampling
settings agree (:func:`~tunelab.inference.sampling_key`), up to ``max_batch_size``
sequences, and generates them in one call in which each row keeps its own ``max_tokens``
and stop strings; streaming and seeded jobs run alone there. Lanes wait meanwhile, which
the server's ``--max-tokens`` cap bounds.

The worker never waits on a client: results and streamed text are handed to callbacks
that only enqueue (the HTTP layer moves them onto the request's asyncio queue). When it
runs out of work it lets the backend return freed memory (``release_memory``), so a burst
of requests does not leave the server that much larger for good.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from tunelab.errors import TunelabError
from tunelab.inference import Completion, GenerationOptions, GenerationRow, LoadedRun, sampling_key

log = logging.getLogger("tunelab.serve")

#: Prompt tokens admitted (prefilled) between two steps, beyond the first row.
ADMIT_TOKENS = 512


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


class Lane(Protocol):
    """A running batch of one model id that advances one token per step (see the module docstring)."""

    def __len__(self) -> int:
        """Rows running now."""

    def supports(self, options: GenerationOptions) -> bool:
        """Whether rows with ``options`` can run here (else the job takes the whole-batch path)."""

    def add(self, rows: Sequence[tuple[GenerationRow, int]]) -> None:
        """Start ``rows`` ((row, choice index in its request)): prefill and choose a first token."""

    def step(self) -> None:
        """One more token for every running row."""

    def pop_finished(self) -> list[tuple[GenerationRow, Completion]]:
        """Remove and return the rows that ended or were cancelled."""

    def abort(self) -> list[GenerationRow]:
        """Drop every row (after a failure) and return them."""


class Backend(Protocol):
    """What generates: the transformers backend, or vLLM.

    A backend may also define ``lane(model) -> Lane | None`` to run that model id with
    continuous batching (None: this model cannot; its jobs take the whole-batch path), and
    ``release_memory()``, called whenever the engine runs out of work.
    """

    models: dict[str, ServedModel]

    def run(self, model: ServedModel, rows: list[GenerationRow]) -> list[Completion]:
        """Generate ``rows`` (one batch, one model id) to the end."""


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
    # The worker's bookkeeping for lanes: rows handed to a lane so far, and results as rows end.
    started: int = field(default=0, init=False, repr=False)
    results: list[Completion | None] = field(default_factory=list, init=False, repr=False)
    answered: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.rows)
        for row in self.rows:
            row.cancelled = self.cancelled

    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys may share a whole batch; None: this job runs alone."""
        options = self.rows[0].options
        if self.stream or options.seed is not None:
            return None
        return (self.model_id, sampling_key(options))

    def answer(self, outcome: list[Completion] | BaseException) -> None:
        """Report ``outcome`` once; a failed job is cancelled so that none of its rows runs on."""
        if self.answered:
            return
        self.answered = True
        if isinstance(outcome, BaseException):
            self.cancelled.set()
        self.on_done(outcome)


class Engine:
    """The request queue and the worker thread that schedules it."""

    def __init__(self, backend: Backend, max_batch_size: int = 8):
        if max_batch_size < 1:
            raise TunelabError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None
        self._lanes: dict[str, Lane | None] = {}  # per model id; None: whole batches only
        self._owner: dict[int, tuple[Job, int]] = {}  # id(row) -> its job and index, while in a lane

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.backend.models

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (not counting rows being generated)."""
        with self._cond:
            return len(self._pending)

    @property
    def running(self) -> int:
        """Rows being generated in lanes now."""
        with self._cond:  # the worker adds lanes under this lock
            return sum(len(lane) for lane in self._lanes.values() if lane is not None)

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
        """Refuse new jobs, finish every queued and running one, then end the worker."""
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
        release = getattr(self.backend, "release_memory", None)
        while (work := self._next_work()) is not None:
            whole, admitted = work
            if whole:
                self._execute(whole)
            for model_id, rows in admitted.items():
                self._guarded(model_id, lambda lane, rows=rows: lane.add(rows), [row for row, _ in rows])
            for model_id, lane in list(self._lanes.items()):
                if lane is not None and len(lane):
                    self._guarded(model_id, lambda lane: lane.step(), [])
            if release is not None and not self.running and not self.queued:
                release()

    def _lane(self, job: Job) -> Lane | None:
        """The lane that can run ``job``, or None for the whole-batch path."""
        if job.model_id not in self._lanes:
            self._lanes[job.model_id] = self._open_lane(job.model_id)
        lane = self._lanes[job.model_id]
        if lane is None or not all(lane.supports(row.options) for row in job.rows):
            return None
        return lane

    def _open_lane(self, model_id: str) -> Lane | None:
        make = getattr(self.backend, "lane", None)
        if make is None:
            return None
        try:
            return make(self.models[model_id])
        except Exception:  # the whole-batch path still serves the model
            log.exception("model '%s' cannot be batched continuously; generating it in whole batches", model_id)
            return None

    def _next_work(self) -> tuple[list[Job], dict[str, list[tuple[GenerationRow, int]]]] | None:
        """What to do before the next step: a whole batch and/or rows to admit; None: closed and idle."""
        with self._cond:
            while not self._pending and not self.running and not self._closing:
                self._cond.wait()
            if not self._pending and not self.running:
                return None
            admitted: dict[str, list[tuple[GenerationRow, int]]] = {}
            free, tokens = self.max_batch_size - self.running, ADMIT_TOKENS
            while self._pending:
                job = self._pending[0]
                if job.cancelled.is_set():  # its client left before it finished starting: drop the rest
                    self._pending.popleft()
                    continue
                if self._lane(job) is None:
                    # Oldest first: a whole batch waits until the rows admitted before it have started.
                    return ([] if admitted else self._whole_batch()), admitted
                while job.started < len(job.rows) and free > 0 and (tokens > 0 or not admitted):
                    row = job.rows[job.started]
                    self._owner[id(row)] = (job, job.started)
                    admitted.setdefault(job.model_id, []).append((row, job.started))
                    job.started += 1
                    free -= 1
                    tokens -= len(row.prompt_ids)
                if job.started < len(job.rows):
                    break
                self._pending.popleft()
            return [], admitted

    def _whole_batch(self) -> list[Job]:
        """The oldest job plus compatible queued whole-batch jobs (called with the lock held)."""
        first = self._pending.popleft()
        batch, size, key = [first], len(first.rows), first.batch_key()
        if key is not None:
            for job in list(self._pending):
                if (job.batch_key() == key and self._lane(job) is None and not job.cancelled.is_set()
                        and size + len(job.rows) <= self.max_batch_size):
                    self._pending.remove(job)
                    batch.append(job)
                    size += len(job.rows)
        return batch

    def _guarded(self, model_id: str, action: Callable[[Lane], None], starting: list[GenerationRow]) -> None:
        """Run ``action`` on the lane of ``model_id``, then hand out the rows that ended.

        On failure every job with a row in the lane (or among ``starting``) gets the error
        and the worker carries on with the other lanes and the queue.
        """
        lane = self._lanes[model_id]
        assert lane is not None
        try:
            action(lane)
            finished = lane.pop_finished()
        except Exception as err:  # reported to the waiting requests; the worker keeps serving
            lost = lane.abort() + starting
            jobs = {id(job): job for job, _ in (self._owner.pop(id(row)) for row in lost if id(row) in self._owner)}
            log.exception("generation failed for model '%s' (%d request(s))", model_id, len(jobs))
            for job in jobs.values():
                job.answer(err)
            return
        for row, completion in finished:
            job, index = self._owner.pop(id(row))
            job.results[index] = completion
            if all(result is not None for result in job.results):
                job.answer([result for result in job.results if result is not None])

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
                job.answer(err)
            return
        start = 0
        for job in live:
            job.answer(results[start:start + len(job.rows)])
            start += len(job.rows)
