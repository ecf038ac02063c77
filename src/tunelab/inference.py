"""Loading a trained run (or a bare base model) for generation, and generating.

``chat``, ``predict``, ``serve`` and ``eval`` all go through :func:`load_run` and
:func:`generate`, and the prompt is rendered by the same template object that rendered
the training data, so inference sees exactly the text format the model was trained on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from tunelab.config import ModelConfig, RunConfig, load_run_config
from tunelab.data.pipeline import with_default_system
from tunelab.data.records import Message
from tunelab.data.templates import ChatTemplate, get_template
from tunelab.methods.base import Method, get_method
from tunelab.models.loader import load_base, pick_device


@dataclass
class LoadedRun:
    """A model ready to generate, with the tokenizer and template it was trained with."""

    model: nn.Module
    tokenizer: Any
    template: ChatTemplate
    cfg: RunConfig
    method: Method | None
    source: str

    def render_prompt(self, messages: list[Message]) -> str:
        return self.template.render(with_default_system(messages, self.cfg.data.system), add_generation_prompt=True)


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def load_run(run_or_model: str | Path, device: torch.device | None = None) -> LoadedRun:
    """Load a run directory (base + trained method) or, for comparison, a bare base model."""
    device = device or pick_device()
    if not is_run_dir(run_or_model):
        cfg = RunConfig(model=ModelConfig(name_or_path=str(run_or_model)))
        model, tokenizer = load_base(cfg.model, device)
        return LoadedRun(model, tokenizer, get_template(cfg.data.template, tokenizer), cfg, None,
                         str(run_or_model))
    run_dir = Path(run_or_model)
    cfg = load_run_config(run_dir)
    base, _ = load_base(cfg.model, device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    method = get_method(cfg.method)
    model = method.load(base, run_dir, trainable=False)
    model.eval()
    return LoadedRun(model, tokenizer, get_template(cfg.data.template, tokenizer), cfg, method, str(run_dir))


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_beams: int = 1
    do_sample: bool | None = None  # None: sample when temperature > 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def to_kwargs(self, tokenizer: Any, stop_ids: list[int]) -> dict[str, Any]:
        sample = self.do_sample if self.do_sample is not None else self.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=sample,
                                      num_beams=self.num_beams, repetition_penalty=self.repetition_penalty,
                                      eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        if sample:
            kwargs.update(temperature=max(self.temperature, 1e-5), top_p=self.top_p, top_k=self.top_k)
        return kwargs


def stop_token_ids(loaded: LoadedRun) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos plus the template's end-of-turn token."""
    ids = {loaded.tokenizer.eos_token_id}
    end = getattr(loaded.template, "end_of_turn", None)
    if end:
        encoded = loaded.tokenizer.encode(end.strip(), add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(i for i in ids if i is not None)


def _truncate_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


@torch.no_grad()
def generate(loaded: LoadedRun, conversations: list[list[Message]], options: GenerationOptions) -> list[str]:
    """Answer each conversation (batched, left-padded); returns the new text only."""
    tokenizer = loaded.tokenizer
    prompts = [loaded.render_prompt(messages) for messages in conversations]
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(loaded.model.parameters()).device
    encoded = {k: v.to(device) for k, v in encoded.items()}
    if options.seed is not None:
        torch.manual_seed(options.seed)
    output = loaded.model.generate(**encoded, **options.to_kwargs(tokenizer, stop_token_ids(loaded)))
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [_truncate_at_stop(text, options.stop).strip() for text in texts]


def stream(loaded: LoadedRun, messages: list[Message], options: GenerationOptions) -> Iterator[str]:
    """Yield the answer piece by piece as it is generated."""
    from transformers import TextIteratorStreamer

    tokenizer = loaded.tokenizer
    prompt = loaded.render_prompt(messages)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    device = next(loaded.model.parameters()).device
    encoded = {k: v.to(device) for k, v in encoded.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    kwargs = dict(**encoded, **options.to_kwargs(tokenizer, stop_token_ids(loaded)), streamer=streamer)
    worker = threading.Thread(target=loaded.model.generate, kwargs=kwargs, daemon=True)
    worker.start()
    emitted = ""
    for piece in streamer:
        if options.stop:
            candidate = _truncate_at_stop(emitted + piece, options.stop)
            if len(candidate) < len(emitted + piece):
                yield candidate[len(emitted):]
                break
        emitted += piece
        yield piece
    worker.join()
