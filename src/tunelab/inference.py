"""Loading a trained run (or a bare base model) for generation, and generating.

``chat``, ``predict``, ``serve`` and ``eval`` all go through :func:`load_run` and one
generation path, :func:`complete` (:func:`generate` and :func:`stream` are its batch and
streaming faces), and the prompt is rendered by the same template object that rendered
the training data, so inference sees exactly the text format the model was trained on.

One stop rule (:class:`_RowState`) decides where every answer ends -- the tokenizer's eos
or the template's end-of-turn token (not shown), the first stop string (cut before it),
or ``max_new_tokens`` -- whether it is streamed or not, alone or in a batch, sampled,
greedy or found by beam search. Methods whose state is virtual tokens generate from a
cache that holds them (:mod:`tunelab.virtual_tokens`).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from tunelab.config import ModelConfig, RunConfig
from tunelab.data.records import Message, Tool
from tunelab.data.templates import ChatTemplate, get_template
from tunelab.errors import TunelabError
from tunelab.generation_options import GenerationOptions
from tunelab.methods.base import Method, get_method
from tunelab.models.loader import load_base, pick_device, with_granted_remote_code
from tunelab.runs import RunDir
from tunelab.virtual_tokens import generation_target


@dataclass
class LoadedRun:
    """A model ready to generate, with the tokenizer and template it was trained with."""

    model: nn.Module
    tokenizer: Any
    template: ChatTemplate
    cfg: RunConfig
    method: Method | None
    source: str

    def render_prompt(self, messages: list[Message], tools: list[Tool] | None = None) -> str:
        """The text the model continues: ``messages`` (offered ``tools``) up to the assistant's turn."""
        return self.template.render(messages, add_generation_prompt=True, tools=tools)


def load_run(run_or_model: str | Path, device: torch.device | None = None) -> LoadedRun:
    """Load a run directory (base + trained method) or, for comparison, a bare base model.

    Model code (``trust_remote_code``) runs only if the command line allowed it
    (:func:`tunelab.models.loader.remote_code_allowed`), whatever the run's config says.
    """
    device = device or pick_device()
    if not RunDir(run_or_model).is_run():
        cfg = RunConfig(model=with_granted_remote_code(ModelConfig(name_or_path=str(run_or_model))))
        model, tokenizer = load_base(cfg.model, device)
        template = get_template(cfg.data.template, tokenizer, system=cfg.data.system)
        return LoadedRun(model, tokenizer, template, cfg, None, str(run_or_model))
    run_dir = Path(run_or_model)
    cfg = RunDir(run_dir).read_config()
    cfg.model = with_granted_remote_code(cfg.model)
    base, _ = load_base(cfg.model, device)
    method = get_method(cfg.method)
    model = method.load(base, run_dir, trainable=False)
    model.eval()
    return wrap_run(model, run_dir, cfg, method)


def wrap_run(model: nn.Module, run_dir: str | Path, cfg: RunConfig, method: Method | None) -> LoadedRun:
    """A run's tokenizer and template around an already loaded ``model``.

    Separate from :func:`load_run` because ``serve`` attaches many runs' adapters to one
    shared module, yet each run must still be prompted exactly as it was trained.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(RunDir(run_dir).tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    template = get_template(cfg.data.template, tokenizer, system=cfg.data.system)
    return LoadedRun(model, tokenizer, template, cfg, method, str(run_dir))


def stop_token_ids(loaded: LoadedRun) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos plus the template's end-of-turn token."""
    ids = {loaded.tokenizer.eos_token_id}
    end = getattr(loaded.template, "end_of_turn", None)
    if end:
        encoded = loaded.tokenizer.encode(end.strip(), add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(i for i in ids if i is not None)


def generate(loaded: LoadedRun, conversations: list[list[Message]], options: GenerationOptions,
             tools: Sequence[list[Tool] | None] | None = None) -> list[str]:
    """Answer each conversation (one left-padded batch); the answers without surrounding whitespace.

    ``tools``: the tool definitions offered in each conversation (None: none at all).
    """
    offered = tools if tools is not None else [None] * len(conversations)
    rows = [GenerationRow(encode_prompt(loaded, messages, own), options)
            for messages, own in zip(conversations, offered)]
    return [completion.text.strip() for completion in complete(loaded, rows)]


def stream(loaded: LoadedRun, messages: list[Message], options: GenerationOptions) -> Iterator[str]:
    """Yield the answer piece by piece as it is generated.

    Text that could be the start of a stop string is held back until it is known not to
    be one, so a stop string never leaks into the output.
    """
    pieces: queue.Queue[str | BaseException | None] = queue.Queue()
    cancelled = threading.Event()
    row = GenerationRow(encode_prompt(loaded, messages), options, on_text=pieces.put, cancelled=cancelled)

    def produce() -> None:
        try:
            complete(loaded, [row])
            pieces.put(None)
        except BaseException as err:  # handed to the consumer, which re-raises it
            pieces.put(err)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while (piece := pieces.get()) is not None:
            if isinstance(piece, BaseException):
                raise piece
            yield piece
    finally:  # also when the consumer stops early: end generation instead of running on unseen
        cancelled.set()
        worker.join()


# ------------------------------------------------------------------ per-row batched generation

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenerationRow:
    """One sequence to generate in a batch, with limits of its own.

    Rows of one batch share the sampling settings (:func:`sampling_key`) but not
    ``max_new_tokens`` or ``stop``: a server batches requests that differ in those.
    ``on_text`` receives the visible text as it grows (streaming); it runs on the
    generating thread, so it must not block.
    """

    prompt_ids: list[int]
    options: GenerationOptions
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event | None = None


@dataclass
class Completion:
    """What one row produced, with the counts an API reports."""

    text: str
    finish_reason: FinishReason  # stop: eos, end of turn or a stop string; length: max_new_tokens
    prompt_tokens: int
    completion_tokens: int  # generated tokens, including the one that ended the answer


def encode_prompt(loaded: LoadedRun, messages: list[Message], tools: list[Tool] | None = None) -> list[int]:
    """Token ids of the rendered prompt, tokenized exactly as :func:`generate` does."""
    return loaded.tokenizer(loaded.render_prompt(messages, tools), add_special_tokens=False)["input_ids"]


def sampling_key(options: GenerationOptions) -> tuple[Any, ...]:
    """The settings that must be equal for rows to be generated in one batch."""
    if not options.sample:
        return (False, options.repetition_penalty, options.num_beams)
    return (True, options.temperature, options.top_p, options.top_k, options.repetition_penalty, options.num_beams,
            options.seed)


def _held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters might still turn into a stop string or a complete character."""
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    while hold < len(text) and text[len(text) - hold - 1] == "\ufffd":  # an incomplete multi-byte character
        hold += 1
    return hold


class _RowState:
    """The stop rule, applied to one row token by token: its tokens, whether and why it ended,
    the text already streamed.

    An answer ends at the first of: a stop token (eos or end of turn; not part of the
    text), the first appearance of a stop string (the text is cut before it), its
    ``max_new_tokens``, or its request being cancelled. Every generation path feeds its
    tokens through here, so streamed, batched, served and beam-searched answers end alike.
    """

    def __init__(self, row: GenerationRow, tokenizer: Any, stop_ids: set[int]):
        self.row = row
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.generated = 0
        self.answer_ids: list[int] = []  # generated ids without the token that ended the turn
        self.reason: FinishReason | None = None
        self.text = ""
        self.streamed = ""
        # Decoding every step costs time; only stop strings and streaming need the running text.
        self.track_text = bool(row.options.stop) or row.on_text is not None

    def add(self, token: int) -> None:
        self.generated += 1
        if token in self.stop_ids:
            self.reason = "stop"
        else:
            self.answer_ids.append(token)
            if self.track_text:
                self._refresh_text()
        if self.reason is None and self.generated >= self.row.options.max_new_tokens:
            self.reason = "length"
        if self.reason is None and self.row.cancelled is not None and self.row.cancelled.is_set():
            self.reason = "cancelled"
        self._stream()

    def replay(self, tokens: list[int]) -> None:
        """Feed a finished sequence (beam search) until the rule ends it; padding after the end is ignored."""
        for token in tokens:
            if self.reason is not None:
                return
            self.add(token)

    def ends_with(self, tokens: list[int]) -> bool:
        """Whether an answer of ``tokens``, open before its last token, ends with it (a beam candidate)."""
        probe = _RowState(replace(self.row, on_text=None), self.tokenizer, self.stop_ids)
        probe.generated, probe.answer_ids = len(tokens) - 1, tokens[:-1]
        probe.add(tokens[-1])
        return probe.reason is not None

    def finish(self) -> Completion:
        """The final completion (a row still open when generation ended ran out of tokens)."""
        if self.reason is None:
            self.reason = "length"
        self._refresh_text()
        self._stream()
        return Completion(self.text, self.reason, len(self.row.prompt_ids), self.generated)

    def _refresh_text(self) -> None:
        text = self.tokenizer.decode(self.answer_ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.row.options.stop if s and s in text), default=-1)
        if cut >= 0:
            text, self.reason = text[:cut], "stop"
        self.text = text

    def _stream(self) -> None:
        if self.row.on_text is None:
            return
        hold = 0 if self.reason is not None else _held_back(self.text, self.row.options.stop)
        visible = self.text[:len(self.text) - hold]
        if len(visible) > len(self.streamed):
            self.row.on_text(visible[len(self.streamed):])
            self.streamed = visible


class _RowLimits(StoppingCriteria):
    """Ends each row of a batch on its own terms (:class:`_RowState`), streaming as it goes."""

    def __init__(self, states: list[_RowState], prompt_width: int):
        self.states = states
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if input_ids.shape[1] > self.prompt_width:
            for state, token in zip(self.states, input_ids[:, -1].tolist()):
                if state.reason is None:
                    state.add(token)
        return torch.tensor([s.reason is not None for s in self.states], dtype=torch.bool, device=input_ids.device)


class _BeamLimits(_RowLimits):
    """Beam search: ends each candidate sequence by the rule of its row (:meth:`_RowState.ends_with`).

    Candidates are regrouped and reordered at every step, so they are judged whole, not
    tracked; the chosen sequence of each row is replayed through its state at the end.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        per_row = input_ids.shape[0] // len(self.states)
        candidates = input_ids[:, self.prompt_width:].tolist()
        ended = [self.states[i // per_row].ends_with(tokens) for i, tokens in enumerate(candidates)]
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def _decoding(options: GenerationOptions, stop_ids: list[int], pad_id: int, max_new_tokens: int) -> dict[str, Any]:
    """transformers' ``generate`` settings for ``options``; eos is the rule's stop tokens."""
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=options.sample,
                                  num_beams=options.num_beams, repetition_penalty=options.repetition_penalty,
                                  eos_token_id=stop_ids, pad_token_id=pad_id)
    if options.sample:
        kwargs.update(temperature=max(options.temperature, 1e-5), top_p=options.top_p, top_k=options.top_k)
    return kwargs


@torch.no_grad()
def complete(loaded: LoadedRun, rows: list[GenerationRow]) -> list[Completion]:
    """Generate every row in one left-padded batch; each row stops on its own limits.

    Padding is done here, not by the tokenizer, so that generation never changes the
    tokenizer's padding state while another thread tokenizes with it. Virtual tokens of
    prompt-learning methods sit in front of every row in the cache, covered by the
    attention mask (see :mod:`tunelab.virtual_tokens`).
    """
    options = rows[0].options
    if any(sampling_key(row.options) != sampling_key(options) for row in rows):
        raise ValueError("rows of one batch must share their sampling settings (see sampling_key)")
    if options.num_beams > 1 and any(row.on_text is not None for row in rows):
        raise TunelabError(f"beam search (num_beams={options.num_beams}) cannot stream: the best answer is known "
                           "only when the search ends. Turn streaming off, or use num_beams=1.")
    if any(not row.prompt_ids for row in rows):
        raise ValueError("every row needs at least one prompt token")
    tokenizer = loaded.tokenizer
    stop_ids = stop_token_ids(loaded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(loaded.model.parameters()).device
    encoded = left_pad([row.prompt_ids for row in rows], pad_id, device)
    width = encoded["input_ids"].shape[1]
    states = [_RowState(row, tokenizer, set(stop_ids)) for row in rows]
    kwargs = _decoding(options, stop_ids, pad_id, max(row.options.max_new_tokens for row in rows))
    if options.seed is not None:
        torch.manual_seed(options.seed)
    limits = _RowLimits(states, width) if options.num_beams == 1 else _BeamLimits(states, width)
    output = generation_target(loaded.model).generate(**encoded, **kwargs,
                                                      stopping_criteria=StoppingCriteriaList([limits]))
    if options.num_beams > 1:
        for state, tokens in zip(states, output[:, width:].tolist()):
            state.replay(tokens)
    return [state.finish() for state in states]
