"""``tunelab eval``: one task on one dataset, for a run and optionally its base model.

Data are read and checked before any model is loaded, so a malformed file fails in a
second, not after minutes of loading. With ``compare_base`` the same prepared data are
scored twice -- by the tuned model and by the model it started from -- and printed side by
side, which shows both the gain on the task and any loss of general ability (forgetting)
when the dataset is a general benchmark.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

from tunelab.config import ModelConfig, RunConfig
from tunelab.errors import ConfigError
from tunelab.evaluate.choice import choice_eval, plan_questions
from tunelab.evaluate.choice_data import load_choice_data
from tunelab.evaluate.forward import model_device
from tunelab.evaluate.generation import check_references, eval_options, generation_eval
from tunelab.evaluate.perplexity import load_perplexity_records, perplexity
from tunelab.evaluate.report import TaskResult, deltas, output_stem, print_table, write_outputs
from tunelab.inference import LoadedRun, load_run
from tunelab.models.loader import load_base
from tunelab.predict import prompts_and_references
from tunelab.runs import RunDir

TASKS = ("perplexity", "generation", "choice")
#: Scores one model on the prepared data; the second argument labels its progress bar (None: no bar).
Evaluator = Callable[[LoadedRun, str | None], TaskResult]


def run_config(run: str) -> RunConfig:
    """The run's saved config, or defaults around a bare model name (what ``load_run`` uses)."""
    return RunDir(run).read_config() if RunDir(run).is_run() else RunConfig(model=ModelConfig(name_or_path=str(run)))


def _check_options(task: str, shots: int, max_samples: int | None, batch_size: int, max_new_tokens: int,
                   stop: Sequence[str], num_beams: int) -> None:
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is not a task; choose one of {', '.join(TASKS)}.")
    if shots < 0 or (shots and task != "choice"):
        raise ConfigError(f"--shots {shots}: few-shot examples apply to --task choice only, and must be >= 0.")
    if max_samples is not None and max_samples <= 0:
        raise ConfigError(f"--max-samples {max_samples} must be positive (leave it out to use every record).")
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ConfigError(f"--batch-size ({batch_size}) and --max-new-tokens ({max_new_tokens}) must be positive.")
    if (stop or num_beams != 1) and task != "generation":
        raise ConfigError(f"--stop and --num-beams shape generated answers, so they apply to --task generation only "
                          f"(--task {task} scores the model's probabilities and generates nothing).")
    eval_options(max_new_tokens, stop, num_beams)  # the generation options' own checks, before any loading


def prepare(task: str, data: str, cfg: RunConfig, shots: int, max_samples: int | None, batch_size: int,
            max_new_tokens: int, chat_format: bool, stop: Sequence[str] = (), num_beams: int = 1) -> Evaluator:
    """Read and check the data now; return the function that scores one model on them."""
    if task == "perplexity":
        records = load_perplexity_records(data, cfg, max_samples)
        return lambda loaded, label: perplexity(loaded, records, batch_size, label)
    if task == "generation":
        prompts = prompts_and_references(data, max_samples)
        check_references(prompts, data)
        return lambda loaded, label: generation_eval(loaded, prompts, batch_size, max_new_tokens, stop, num_beams,
                                                     label)
    planned = plan_questions(load_choice_data(data), shots, max_samples)
    return lambda loaded, label: choice_eval(loaded, planned, batch_size, chat_format, label)


@contextmanager
def base_model(loaded: LoadedRun) -> Iterator[LoadedRun]:
    """The run's starting model, prompted with the run's tokenizer and template.

    Adapter methods switch their adapter off (``method.reference``: no second copy in
    memory); methods that changed the weights themselves (full, freeze) load the base
    again. Either way the prompt format is the run's, so the two columns differ only in
    the weights.
    """
    if loaded.method is None:
        raise ConfigError(f"--compare-base compares a trained run with its base model, but {loaded.source} is a "
                          "bare model, not a run directory. Pass the output_dir of a `tunelab train` run.")
    source = loaded.cfg.model.name_or_path
    switched_off = loaded.method.reference(loaded.model)
    if switched_off is not None:
        with switched_off as model:
            yield replace(loaded, model=model, method=None, source=f"{source} (adapter disabled)")
        return
    base, _ = load_base(loaded.cfg.model, model_device(loaded.model))
    yield replace(loaded, model=base, method=None, source=source)


def eval_main(run: str, task: str, data: str, compare_base: bool, shots: int, max_samples: int | None,
              batch_size: int, max_new_tokens: int, chat_format: bool = True, stop: Sequence[str] = (),
              num_beams: int = 1, progress: bool = False) -> dict[str, Any]:
    """Evaluate ``run`` (a run directory or a bare model) on ``data``; print the table, write and return the result.

    ``stop``/``num_beams``: how generated answers end and are searched (``--task generation``);
    ``progress``: show a bar on the terminal per model scored.
    """
    _check_options(task, shots, max_samples, batch_size, max_new_tokens, stop, num_beams)
    evaluate = prepare(task, data, run_config(run), shots, max_samples, batch_size, max_new_tokens, chat_format,
                       stop, num_beams)
    loaded = load_run(run)
    tuned = evaluate(loaded, (f"{task} (tuned)" if compare_base else task) if progress else None)
    base: TaskResult | None = None
    if compare_base:
        with base_model(loaded) as reference:
            base = evaluate(reference, f"{task} (base)" if progress else None)
    result: dict[str, Any] = {
        "task": task, "run": str(run), "data": str(data), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": {"shots": shots, "max_samples": max_samples, "batch_size": batch_size,
                     "max_new_tokens": max_new_tokens, "chat_format": chat_format, "stop": list(stop),
                     "num_beams": num_beams},
        "tuned": tuned.metrics}
    if base is not None:
        result.update(base=base.metrics, base_model=loaded.cfg.model.name_or_path,
                      delta=deltas(tuned.metrics, base.metrics))
    result["files"] = write_outputs(output_stem(str(run), task), result, tuned, base)
    print_table(f"tunelab eval {task}", f"{run} on {data}", tuned.metrics,
                base.metrics if base is not None else None)
    return result
