"""The ``tunelab`` command: one sub-command per job.

User errors (:class:`TunelabError`) are printed as one paragraph without a traceback and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from tunelab.errors import TunelabError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that sleep instead of spinning while they wait: with more busy processes
# than cores (a shared machine, a server next to training) spinning made each op 10-70x
# slower in benchmarks/speed.py; must be set before torch loads libgomp. Override by
# exporting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Third-party notices that say nothing actionable to a tunelab user: bitsandbytes' optional
# CPU kernel package (it would come from a hub we never reach), and a transformers
# deprecation raised inside PEFT.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune large language models end to end.")


def _quiet_libraries() -> None:
    """transformers' per-load progress bars would bury our own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except TunelabError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


# -- shared generation options ----------------------------------------------------------
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling threshold.")]
TopK = Annotated[int, typer.Option(help="Sample among the k most likely tokens.")]
RepetitionPenalty = Annotated[float, typer.Option(help=">1 discourages repeating tokens.")]
NumBeams = Annotated[int, typer.Option(help="Beam search width (1 = no beam search).")]
DoSample = Annotated[Optional[bool], typer.Option("--do-sample/--greedy", help="Force sampling or greedy.")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]


def _generation(max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                num_beams: int, do_sample: bool | None, seed: int | None):
    from tunelab.inference import GenerationOptions

    return GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, num_beams=num_beams, do_sample=do_sample,
                             seed=seed)


@app.command()
@_friendly
def train(
    config: Annotated[Path, typer.Argument(help="YAML run file.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in output_dir.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over in an output_dir that holds a run.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Fine-tune a model as described by CONFIG."""
    from tunelab.config import load_config
    from tunelab.train import run_stage

    cfg = load_config(config, overrides or [])
    result = run_stage(cfg, resume=resume, overwrite=overwrite, progress=not quiet)
    state = "stopped (resume with --resume)" if result.interrupted else "done"
    eval_part = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    loss_part = f", train loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    typer.echo(f"{state}: {result.steps} steps in {result.wall_s:.1f}s{loss_part}{eval_part}, "
               f"{result.tokens_per_s:.0f} tokens/s, peak memory {result.peak_memory_bytes / 2**30:.2f} GiB "
               f"-> {result.run_dir}")


@app.command()
@_friendly
def chat(
    run: Annotated[str, typer.Argument(help="Run directory, or a base model (name, directory, .gguf).")],
    prompt: Annotated[Optional[str], typer.Option(help="Answer this once and exit.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_new_tokens: MaxNewTokens = 256, temperature: Temperature = 0.0, top_p: TopP = 1.0, top_k: TopK = 50,
    repetition_penalty: RepetitionPenalty = 1.0, num_beams: NumBeams = 1, do_sample: DoSample = None,
    seed: Seed = None,
) -> None:
    """Chat with a trained run (streaming, multi-turn). Type 'exit' to quit, 'clear' to start over."""
    from tunelab.data.records import Message
    from tunelab.inference import load_run, stream

    options = _generation(max_new_tokens, temperature, top_p, top_k, repetition_penalty, num_beams, do_sample,
                          seed)
    loaded = load_run(run)
    history: list[Message] = [Message("system", system)] if system else []
    interactive = prompt is None
    while True:
        if interactive:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if text in ("exit", "quit"):
                break
            if text == "clear":
                history = history[:1] if system else []
                continue
            if not text:
                continue
            typer.echo("assistant> ", nl=False)
        else:
            text = prompt
        history.append(Message("user", text))
        answer = ""
        for piece in stream(loaded, history, options):
            answer += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append(Message("assistant", answer.strip()))
        if not interactive:
            break


@app.command()
@_friendly
def predict(
    run: Annotated[str, typer.Argument(help="Run directory, or a base model.")],
    data: Annotated[Path, typer.Option(help="Dataset file (alpaca, sharegpt, OpenAI messages).")],
    out: Annotated[Path, typer.Option(help="Output .jsonl: prompt, prediction, reference per record.")],
    batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = 8,
    max_samples: Annotated[Optional[int], typer.Option(help="Only the first N records.")] = None,
    max_new_tokens: MaxNewTokens = 256, temperature: Temperature = 0.0, top_p: TopP = 1.0, top_k: TopK = 50,
    repetition_penalty: RepetitionPenalty = 1.0, num_beams: NumBeams = 1, do_sample: DoSample = None,
    seed: Seed = None,
) -> None:
    """Generate an answer for every record of a dataset file."""
    from tunelab.predict import predict_file

    options = _generation(max_new_tokens, temperature, top_p, top_k, repetition_penalty, num_beams, do_sample,
                          seed)
    count = predict_file(run, data, out, options, batch_size=batch_size, max_samples=max_samples)
    typer.echo(f"wrote {count} predictions to {out}")


@app.command()
@_friendly
def export(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    out: Annotated[Path, typer.Option(help="Directory for the merged transformers model.")],
) -> None:
    """Merge the trained method into the base and write a plain transformers model directory."""
    from tunelab.export.merge import export_run

    export_run(run, out)
    typer.echo(f"merged model written to {out} (loads with AutoModelForCausalLM.from_pretrained)")


@app.command("eval")
@_friendly
def evaluate(
    run: Annotated[str, typer.Argument(help="Run directory, or a base model.")],
    task: Annotated[str, typer.Option(help="perplexity | generation | choice")],
    data: Annotated[str, typer.Option(help="Dataset file (or a directory of CSVs for choice).")],
    compare_base: Annotated[bool, typer.Option(help="Also evaluate the base model and print both.")] = False,
    shots: Annotated[int, typer.Option(help="choice: solved examples in the prompt.")] = 0,
    max_samples: Annotated[Optional[int], typer.Option(help="Evaluate at most N records (per subject).")] = None,
    batch_size: Annotated[int, typer.Option(help="Records per forward/generation batch.")] = 8,
    max_new_tokens: MaxNewTokens = 128,
    chat_format: Annotated[bool, typer.Option(help="choice: ask through the chat template.")] = True,
) -> None:
    """Evaluate a run: perplexity, generation metrics (BLEU/ROUGE/exact match) or multiple choice."""
    from tunelab.evaluate import eval_main

    eval_main(run, task, data, compare_base, shots, max_samples, batch_size, max_new_tokens, chat_format=chat_format)


@app.command("compare")
@_friendly
def compare_methods(
    config: Annotated[Path, typer.Argument(help="YAML run file: the job every method runs.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides for all methods.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated method types.")] = "lora,dora,ia3,prefix,prompt",
    out: Annotated[Path, typer.Option(help="Directory for compare.md/png/json and the runs.")] = Path("runs/compare"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Per-method override METHOD:key=value.")] = None,
) -> None:
    """Train several methods on the same data, steps and seed, and tabulate the results."""
    from tunelab.compare import compare, markdown_table

    results = compare(config, overrides or [], [m.strip() for m in methods.split(",") if m.strip()], out,
                      set_ or [], echo=typer.echo)
    typer.echo(markdown_table(results))
    typer.echo(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")


@app.command()
@_friendly
def estimate(
    config: Annotated[Path, typer.Argument(help="YAML run file.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, or a GPU like cuda:80GB.")] = None,
    gpus: Annotated[int, typer.Option(help="Number of GPUs (data parallel).")] = 1,
    zero: Annotated[int, typer.Option(help="DeepSpeed ZeRO stage 0-3 when --gpus > 1.")] = 0,
    measure: Annotated[bool, typer.Option(help="Also run a few steps and print measured vs predicted.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Predict the peak memory of a run, broken down by what uses it."""
    from tunelab.estimate import estimate_main

    estimate_main(str(config), overrides or [], device, gpus, zero, measure, as_json)


@app.command()
@_friendly
def score(
    run: Annotated[str, typer.Argument(help="Reward-model run directory (stage rm).")],
    data: Annotated[Path, typer.Option(help="Dataset file: conversations or preference pairs.")],
    out: Annotated[Path, typer.Option(help="Output .jsonl with a score per response.")],
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
) -> None:
    """Score responses with a trained reward model."""
    from tunelab.score import score_main

    summary = score_main(run, str(data), str(out), batch_size)
    accuracy = f", pair accuracy {summary.accuracy:.3f}" if summary.accuracy is not None else ""
    typer.echo(f"scored {summary.responses} responses{accuracy} -> {summary.out}")


@app.command()
@_friendly
def serve(
    runs: Annotated[list[str], typer.Argument(help="Run directories trained on the same base.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="TUNELAB_API_KEY",
                                                   help="Require 'Authorization: Bearer KEY'.")] = None,
    backend: Annotated[str, typer.Option(help="transformers, or vllm (CUDA + vllm installed).")] = "transformers",
    max_batch_size: Annotated[int, typer.Option(help="Most sequences generated together in one batch.")] = 8,
) -> None:
    """Serve runs (and their base) behind an OpenAI-compatible API."""
    from tunelab.serve import serve_main

    serve_main(runs, host, port, api_key, backend, max_batch_size)


@app.command("config-keys")
def config_keys() -> None:
    """List every valid configuration key."""
    from tunelab.config import VALID_KEYS

    for key in VALID_KEYS:
        typer.echo(key)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
