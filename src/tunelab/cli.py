"""The ``tunelab`` command: one sub-command per job.

User errors (:class:`TunelabError`) are printed as one paragraph without a traceback and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, get_type_hints

import typer

from tunelab.errors import ConfigError, TunelabError
from tunelab.generation_options import GenerationOptions

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


def version_line() -> str:
    """tunelab's version and those of the libraries a bug report needs, read without importing them (fast)."""
    from importlib.metadata import PackageNotFoundError, version

    from tunelab import __version__

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "peft", "accelerate"))
    return f"tunelab {__version__} (Python {sys.version.split()[0]}; {libraries})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version (and torch's, transformers', ...) and exit.")
                             ] = False) -> None:
    """The options of ``tunelab`` itself, before a command (the app's help text is set on the Typer)."""


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
def _generation_flag(name: str) -> Any:
    """Field ``name`` of :class:`GenerationOptions` as a typed flag: where it is declared once."""
    spec = next(spec for spec in dataclasses.fields(GenerationOptions) if spec.name == name)
    decls = [spec.metadata["flag"]] if spec.metadata["flag"] else []
    return Annotated[get_type_hints(GenerationOptions)[name], typer.Option(*decls, help=spec.metadata["help"])]


def _generation_options(**defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command a flag for every generation option, and the command one ``options`` argument.

    Names, types, defaults and help come from :class:`GenerationOptions`, so chat and
    predict stay alike (and like the server, whose request fields map onto that class).
    ``defaults`` are the command's own (chat and predict decode greedily by default).
    """
    specs = dataclasses.fields(GenerationOptions)

    def default(spec: dataclasses.Field) -> Any:
        if spec.name in defaults:
            return defaults[spec.name]
        return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default  # type: ignore[misc]

    flags = [inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=default(spec),
                               annotation=_generation_flag(spec.name)) for spec in specs]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]

        @functools.wraps(command)
        def with_options(*args: Any, **kwargs: Any) -> Any:
            options = GenerationOptions(**{spec.name: kwargs.pop(spec.name) for spec in specs})
            return command(*args, options=options, **kwargs)

        with_options.__signature__ = inspect.Signature(own + flags)  # type: ignore[attr-defined]
        with_options.__annotations__ = {p.name: p.annotation for p in own + flags}
        return with_options

    return decorate


#: eval decodes deterministically (scores depend on the model alone): the answer length, stop strings and beams only.
MaxNewTokens, StopStrings, NumBeams = (_generation_flag(name) for name in ("max_new_tokens", "stop", "num_beams"))
#: predict and eval draw a progress bar on a terminal (never into a pipe or log file).
Quiet = Annotated[bool, typer.Option(help="No progress bar.")]
# Only the person running a command may let model code run; a run directory's config.yaml never can.
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow the base model's own Python code (auto_map) to run. Only for code you trust.")]

#: `tunelab train`'s exit status when Ctrl-C/SIGTERM stopped the run after a checkpoint (0: finished, 2: user
#: error), so a script or scheduler can tell "resume me" from "done" and from "fix the input".
EXIT_STOPPED = 3


@app.command()
@_friendly
def train(
    config: Annotated[Path, typer.Argument(help="YAML run file (tunelab's, or a LLaMA-Factory training YAML).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in output_dir.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over in an output_dir that holds a run; the old run is "
                                                 "moved aside to NAME.replaced-<UTC time>/.")] = False,
    discard: Annotated[bool, typer.Option(help="With --overwrite: delete the old run instead of moving it "
                                               "aside.")] = False,
    force: Annotated[bool, typer.Option(help="Write the run into an output_dir that holds other files (not a "
                                             "run).")] = False,
    allow_config_change: Annotated[bool, typer.Option(help="With --resume: continue although the config changed "
                                                           "train.lr, the length, logging/eval/save cadence or "
                                                           "memory settings (never what is trained).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    nproc_per_node: Annotated[Optional[int], typer.Option(
        min=1, help="Train with N processes on this machine: re-launches this command under torchrun "
                    "(train.distributed picks ddp or fsdp).")] = None,
) -> None:
    """Fine-tune a model as described by CONFIG.

    Exit codes: 0 finished; 2 user error (config, data, output_dir; nothing was trained);
    3 stopped by Ctrl-C/SIGTERM after saving a checkpoint (continue with --resume).
    """
    from tunelab.config import load_config
    from tunelab.config_llamafactory import read_llamafactory
    from tunelab.estimate.budget import fit_memory_budget
    from tunelab.train import run_stage

    converted = read_llamafactory(config)  # None for a tunelab YAML
    if converted is not None:
        typer.secho(converted.notice(), fg=typer.colors.YELLOW, err=True)
        resume, overwrite = resume or converted.resume, overwrite or converted.overwrite
        force = force or converted.overwrite  # LLaMA-Factory's overwrite_output_dir also writes into a non-run dir
    cfg = converted.config(overrides or []) if converted else load_config(config, overrides or [])
    if nproc_per_node is not None and "WORLD_SIZE" not in os.environ:
        _train_relaunched(cfg, nproc_per_node)
        return
    cfg, budget = fit_memory_budget(cfg)  # train.memory_budget -> memory settings, before the model loads
    result = run_stage(cfg, resume=resume, overwrite=overwrite, discard=discard, force=force,
                       allow_config_change=allow_config_change, progress=not quiet, budget=budget)
    if int(os.environ.get("RANK", "0")) != 0:  # one summary per launch, from the main process
        raise typer.Exit(EXIT_STOPPED if result.interrupted else 0)
    state = "stopped (resume with --resume)" if result.interrupted else "done"
    eval_part = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    loss_part = (f", train loss {result.mean_loss:.4f} (mean of the steps; last {result.final_loss:.4f})"
                 if result.mean_loss is not None and result.final_loss is not None else "")
    typer.echo(f"{state}: {result.steps} steps in {result.wall_s:.1f}s{loss_part}{eval_part}, "
               f"{result.tokens_per_s:.0f} tokens/s, peak memory {result.peak_memory_bytes / 2**30:.2f} GiB "
               f"-> {result.run_dir}")
    if result.budget is not None:
        typer.echo(result.budget.report(result.peak_memory_bytes))
    if result.interrupted:
        raise typer.Exit(EXIT_STOPPED)


def _train_relaunched(cfg: Any, nproc_per_node: int) -> None:
    """``tunelab train --nproc-per-node N``: the same command under torchrun; exit 3 when the run stopped."""
    from tunelab.runs import RunDir
    from tunelab.train.distributed import check_distributed
    from tunelab.train.launch import relaunch

    check_distributed(cfg, nproc_per_node)  # a setting that cannot work fails here, before N processes start
    code = relaunch(nproc_per_node, sys.argv[1:])
    status = RunDir(cfg.output_dir).read_status()
    if status is not None and status.status == "stopped":
        raise typer.Exit(EXIT_STOPPED)
    if code:
        raise typer.Exit(code)


@app.command()
@_friendly
@_generation_options(temperature=0.0)
def chat(
    run: Annotated[str, typer.Argument(help="Run directory, or a base model (name, directory, .gguf).")],
    prompt: Annotated[Optional[str], typer.Option(help="Answer this once and exit.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    stream: Annotated[Optional[bool], typer.Option(
        "--stream/--no-stream", help="Print the answer as it is generated (default: yes, unless --num-beams > 1).")
    ] = None,
    trust_remote_code: TrustRemoteCode = False, *, options: GenerationOptions,
) -> None:
    """Chat with a trained run (streaming, multi-turn). /help lists the commands, /exit or Ctrl-D quits,
    Ctrl-C stops an answer."""
    from tunelab.chat_repl import ChatSession, interactive
    from tunelab.inference import load_run
    from tunelab.models.loader import remote_code_allowed

    if stream and options.num_beams > 1:
        raise ConfigError(f"--stream cannot be used with --num-beams {options.num_beams}: beam search knows the best "
                          "answer only when the search ends. Leave out --stream (answers then print whole), or use "
                          "--num-beams 1.")
    if stream is None and options.num_beams > 1:
        typer.secho(f"note: --num-beams {options.num_beams}: each answer is printed when the beam search ends "
                    "(beam search does not stream).", err=True)
    streaming = stream if stream is not None else options.num_beams == 1
    with remote_code_allowed(trust_remote_code):
        loaded = load_run(run)
    session = ChatSession(loaded, options, streaming, system)
    if prompt is None:
        interactive(session)
        return
    session.answer(prompt)
    if session.stopped:
        raise typer.Exit(130)  # the shell's status for Ctrl-C: a script must not take a cut answer for a whole one


@app.command()
@_friendly
@_generation_options(temperature=0.0)
def predict(
    run: Annotated[str, typer.Argument(help="Run directory, or a base model.")],
    data: Annotated[Path, typer.Option(help="Dataset file (alpaca, sharegpt, OpenAI messages).")],
    out: Annotated[Path, typer.Option(help="Output .jsonl: prompt, prediction, reference per record.")],
    batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = 8,
    max_samples: Annotated[Optional[int], typer.Option(help="Only the first N records.")] = None,
    quiet: Quiet = False,
    trust_remote_code: TrustRemoteCode = False, *, options: GenerationOptions,
) -> None:
    """Generate an answer for every record of a dataset file."""
    from tunelab.models.loader import remote_code_allowed
    from tunelab.predict import predict_file

    with remote_code_allowed(trust_remote_code):
        count = predict_file(run, data, out, options, batch_size=batch_size, max_samples=max_samples,
                             progress=not quiet)
    typer.echo(f"wrote {count} predictions to {out}")


@app.command()
@_friendly
def export(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    out: Annotated[Path, typer.Option(help="Output directory (replaced as a whole when the export is complete).")],
    fmt: Annotated[str, typer.Option("--format", help="safetensors (a transformers directory) or gguf (llama.cpp, "
                                                      "Ollama).")] = "safetensors",
    dtype: Annotated[Optional[str], typer.Option(help="bf16 | fp16 | fp32; default: the base model's own.")] = None,
    gguf_type: Annotated[Optional[str], typer.Option(help="With --format gguf: f16 | bf16 | q8_0 | f32; default: "
                                                          "the --dtype's.")] = None,
    ollama: Annotated[bool, typer.Option(help="With --format gguf: also write an Ollama Modelfile.")] = False,
    adapter_only: Annotated[bool, typer.Option(help="Write the adapter alone, as a PEFT directory (no merge).")
                            ] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Merge the trained method into the base and write it (transformers directory or GGUF), or the adapter alone."""
    from tunelab.export.main import export_main
    from tunelab.models.loader import remote_code_allowed

    with remote_code_allowed(trust_remote_code):
        lines = export_main(run, out, fmt, dtype, gguf_type, adapter_only, ollama)
    for line in lines:
        typer.echo(line)


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
    stop: StopStrings = [],  # noqa: B006 - typer reads the default, never mutates it
    num_beams: NumBeams = 1,
    chat_format: Annotated[bool, typer.Option(help="choice: ask through the chat template.")] = True,
    quiet: Quiet = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Evaluate a run: perplexity, generation metrics (BLEU/ROUGE/exact match) or multiple choice."""
    from tunelab.evaluate import eval_main
    from tunelab.models.loader import remote_code_allowed

    with remote_code_allowed(trust_remote_code):
        eval_main(run, task, data, compare_base, shots, max_samples, batch_size, max_new_tokens,
                  chat_format=chat_format, stop=stop, num_beams=num_beams, progress=not quiet)


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
    written = [out / name for name in ("compare.md", "compare.json", "compare.png") if (out / name).exists()]
    typer.echo(f"wrote {', '.join(map(str, written))}")


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
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Score responses with a trained reward model."""
    from tunelab.models.loader import remote_code_allowed
    from tunelab.score import score_main

    with remote_code_allowed(trust_remote_code):
        summary = score_main(run, str(data), str(out), batch_size)
    accuracy = f", pair accuracy {summary.accuracy:.3f}" if summary.accuracy is not None else ""
    typer.echo(f"scored {summary.responses} responses{accuracy} -> {summary.out}")


@app.command()
@_friendly
def serve(
    runs: Annotated[list[str], typer.Argument(help="Run directories trained on the same base, or one base "
                                                   "model to serve alone.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="TUNELAB_API_KEY",
                                                   help="Require 'Authorization: Bearer KEY'.")] = None,
    backend: Annotated[str, typer.Option(help="transformers, or vllm (CUDA + vllm installed).")] = "transformers",
    max_batch_size: Annotated[int, typer.Option(help="Most sequences generated together (continuous batching).")] = 32,
    max_tokens: Annotated[int, typer.Option(help="Longest answer one request may ask for (also capped by the "
                                                 "model's context).")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted; larger ones get a 413.")
                              ] = 2 * 1024 * 1024,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Serve runs (and their base) behind an OpenAI-compatible API."""
    from tunelab.models.loader import remote_code_allowed
    from tunelab.serve import serve_main

    with remote_code_allowed(trust_remote_code):
        serve_main(runs, host, port, api_key, backend, max_batch_size, max_tokens, max_body_bytes)


@app.command()
@_friendly
def webui(
    host: Annotated[str, typer.Option(help="Address to listen on; other than localhost needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    runs_dir: Annotated[Path, typer.Option(help="Directory of the runs to show and start.")] = Path("runs"),
    api_key: Annotated[Optional[str], typer.Option(envvar="TUNELAB_API_KEY",
                                                   help="Require this key: browsers sign in at /login, scripts "
                                                        "send 'Authorization: Bearer KEY'.")] = None,
) -> None:
    """Browser UI and JSON API: train, watch runs live, chat, evaluate, export, compare (runs outlive it)."""
    from tunelab.webui import webui_main

    webui_main(host, port, runs_dir, api_key, app)


@app.command("config-keys")
@_friendly
def config_keys(
    method: Annotated[Optional[str], typer.Option(help="Only this method type's keys in the method section.")] = None,
    stage: Annotated[Optional[str], typer.Option(help="Leave out the sections this stage does not read.")] = None,
) -> None:
    """List every configuration key with its type, default and what it does."""
    from tunelab.config import describe_keys

    groups = describe_keys(method, stage)
    width = max(len(doc.key) for group in groups for doc in group.keys)
    for group in groups:
        typer.secho(f"\n{group.title}", bold=True)
        for doc in group.keys:
            default = f" = {doc.default}" if doc.default else ""
            typer.echo(f"  {doc.key:<{width}}  {doc.type}{default}")
            typer.echo(f"  {'':<{width}}  {doc.help}")


config_app = typer.Typer(no_args_is_help=True, help="Work with config files.")
app.add_typer(config_app, name="config")


@config_app.command("convert")
@_friendly
def config_convert(
    config: Annotated[Path, typer.Argument(help="A LLaMA-Factory training YAML.")],
) -> None:
    """Print the tunelab YAML equivalent of a LLaMA-Factory training YAML (redirect it to a file)."""
    from tunelab.config_llamafactory import read_llamafactory
    from tunelab.errors import ConfigError

    converted = read_llamafactory(config)
    if converted is None:
        raise ConfigError(f"{config} is not a LLaMA-Factory training YAML (it has tunelab sections, or none of "
                          "model_name_or_path, finetuning_type, dataset); tunelab reads it as it is.")
    typer.echo(converted.to_yaml(), nl=False)


data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect a run's training data.")
app.add_typer(data_app, name="data")
ConfigOverrides = Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides.")]


@data_app.command("prepare")
@_friendly
def data_prepare(config: Annotated[Path, typer.Argument(help="YAML run file.")],
                 overrides: ConfigOverrides = None) -> None:
    """Tokenize and cache CONFIG's data (no training); print what became of the records."""
    from tunelab.data_commands import prepare_main

    typer.echo(prepare_main(config, overrides or []))


@data_app.command("preview")
@_friendly
def data_preview(config: Annotated[Path, typer.Argument(help="YAML run file.")], overrides: ConfigOverrides = None,
                 n: Annotated[int, typer.Option("-n", help="Examples to show.")] = 3) -> None:
    """Show the first examples as the model sees them, the supervised spans marked [[ ]]."""
    from tunelab.data_commands import preview_main

    typer.echo(preview_main(config, overrides or [], n))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
