"""Evaluate & predict, Export, Compare: forms over the ``tunelab`` commands, launched as jobs.

Each form is built from its command's own options (:mod:`tunelab.webui.cli_form`); the
job runs detached (:mod:`tunelab.webui.jobs`), and its log and results are read back
from disk on every refresh.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from tunelab.errors import TunelabError
from tunelab.io import write_text
from tunelab.webui.cli_form import CliParam, build_argv, command_params
from tunelab.webui.jobs import JobView
from tunelab.webui.views.chat import text_of
from tunelab.webui.views.common import (CODE_LINES, FIELD_CLASS, LOG_CLASS, LOG_LINES, REFRESH_S, Services,
                                        failure)

Prepare = Callable[[dict[str, Any], tuple[Any, ...]], dict[str, Any]]
_PREVIEW_ROWS = 20


def _widget(param: CliParam, command: str, initial: Any) -> gr.components.Component:
    """A field for ``param`` holding ``initial`` (its default unless the view knows better)."""
    common = dict(label=param.label, info=param.help, elem_classes=[FIELD_CLASS], elem_id=f"{command}-{param.name}")
    if param.name == "run":
        return gr.Dropdown(choices=[], allow_custom_value=True, **common)
    if param.is_flag and param.default is None:
        return gr.Dropdown(choices=["", param.flag, param.negative], value="", **common)
    if param.is_flag:
        return gr.Checkbox(value=bool(initial), **common)
    if isinstance(initial, (int, float)) and not isinstance(initial, bool) and not param.many:
        return gr.Number(value=initial, precision=0 if isinstance(initial, int) else None, **common)
    shown = " ".join(map(str, initial)) if isinstance(initial, (list, tuple)) else initial  # many: space-separated
    return gr.Textbox(value="" if shown is None else str(shown), max_lines=1, **common)


def _flag_value(param: CliParam, value: Any) -> Any:
    """A three-way flag's dropdown (""/--on/--off) as build_argv's None/True/False."""
    if param.is_flag and param.default is None:
        return None if not value else value == param.flag
    return value


def _predictions_markdown(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:_PREVIEW_ROWS]]
    lines = ["| prompt | prediction | reference |", "|---|---|---|"]
    for row in rows:
        prompt = text_of(row["prompt"][-1]["content"]) if row.get("prompt") else ""
        cells = [prompt, row.get("prediction") or "", row.get("reference") or ""]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ")[:200] for c in cells) + " |")
    return "\n".join(lines)


def job_result(job: JobView) -> tuple[str, str | None]:
    """What a finished job produced, as markdown, and an image when it drew one."""
    if job.status != "finished":
        return "", None
    if "predictions" in job.outputs and Path(job.outputs["predictions"]).is_file():
        return _predictions_markdown(Path(job.outputs["predictions"])), None
    if "compare" in job.outputs:
        out = Path(job.outputs["compare"])
        table = out / "compare.md"
        image = out / "compare.png"
        return (table.read_text(encoding="utf-8") if table.is_file() else ""), \
            (str(image) if image.is_file() else None)
    if "export" in job.outputs:
        out = Path(job.outputs["export"])
        files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        return f"Written to `{out}`: " + ", ".join(f"`{name}`" for name in files), None
    return "", None


def cli_panel(services: Services, page: gr.Blocks, command: str, outputs_of: Callable[[dict[str, Any]], dict[str, str]],
              hidden: tuple[str, ...] = (), extra_inputs: tuple[gr.components.Component, ...] = (),
              prepare: Prepare | None = None, initial: dict[str, Any] | None = None) -> None:
    """A form for ``tunelab COMMAND``, a launch button, this command's jobs, the chosen job's log and result.

    ``outputs_of`` names what a job writes (from the form values); ``hidden`` parameters
    are filled by ``prepare`` from ``extra_inputs`` instead of a field of their own;
    ``initial`` replaces the command's defaults in the form (paths under the runs directory).
    """
    params = [p for p in command_params(services.cli, command) if p.name not in hidden]
    widgets: list[gr.components.Component] = []
    with gr.Row(equal_height=False):
        for param in params:
            widgets.append(_widget(param, command, (initial or {}).get(param.name, param.default)))
    launch = gr.Button(f"Run tunelab {command}", variant="primary", elem_id=f"{command}-launch")
    message = gr.Markdown(elem_id=f"{command}-message")
    with gr.Row():
        job = gr.Dropdown(label="job", choices=[], elem_id=f"{command}-job", scale=3)
        stop = gr.Button("Stop job", elem_id=f"{command}-stop", scale=1)
    status = gr.Markdown(elem_id=f"{command}-status")
    result = gr.Markdown(elem_id=f"{command}-result")
    image = gr.Image(label="plot", visible=command == "compare", interactive=False, elem_id=f"{command}-image")
    log = gr.Textbox(label="job log (tail)", lines=LOG_LINES, max_lines=LOG_LINES, elem_classes=[LOG_CLASS],
                     elem_id=f"{command}-log")
    run_widget = next((w for p, w in zip(params, widgets) if p.name == "run"), None)

    def start(*values: Any) -> tuple[Any, str]:
        form = {p.name: _flag_value(p, v) for p, v in zip(params, values[:len(params)])}
        if form.get("run") in services.runs.finished():  # a run's id in the picker: the command takes its path
            form["run"] = str(services.runs.runs_dir / form["run"])
        try:
            if prepare is not None:
                form = prepare(form, values[len(params):])
            argv = build_argv(command, command_params(services.cli, command), form)
            job_id = services.jobs.start(argv, outputs_of(form))
        except TunelabError as err:
            return gr.update(), failure(err)
        ids = [j.id for j in services.jobs.list(command)]
        return gr.update(choices=ids, value=job_id), f"Started `tunelab {' '.join(argv)}` as job {job_id}."

    def refresh(job_id: str | None) -> list[Any]:
        jobs = services.jobs.list(command)
        ids = [j.id for j in jobs]
        valid = job_id in ids
        job_id = job_id if valid else (ids[0] if ids else None)
        if job_id is None:
            return [gr.update(choices=[], value=None), "No jobs yet.", "", None, ""]
        view = next(j for j in jobs if j.id == job_id)
        text, picture = job_result(view)
        line = f"**{view.status}**" + (f" (exit code {view.returncode})" if view.returncode else "") + \
            f" — `tunelab {' '.join(view.argv)}`"
        chosen = gr.update(choices=ids) if valid else gr.update(choices=ids, value=job_id)  # keep the user's pick
        return [chosen, line, text, picture, services.jobs.log_tail(job_id, LOG_LINES)]

    def stop_job(job_id: str | None) -> str:
        if not job_id:
            return "Choose a job first."
        try:
            return f"job {job_id} is {services.jobs.stop(job_id).status}"
        except TunelabError as err:
            return failure(err)

    launch.click(start, [*widgets, *extra_inputs], [job, message])
    gr.Timer(REFRESH_S).tick(refresh, job, [job, status, result, image, log], show_progress="hidden")
    job.input(refresh, job, [job, status, result, image, log])
    stop.click(stop_job, job, status)
    if run_widget is not None:
        def runs_changed(current: str | None) -> Any:
            finished = services.runs.finished()
            return gr.update(choices=finished, value=current or (finished[0] if finished else None))

        gr.on([page.load, run_widget.focus], runs_changed, run_widget, run_widget)


def build_evaluate(services: Services, page: gr.Blocks) -> None:
    runs_dir = services.runs.runs_dir
    with gr.Tab("Evaluate"):
        cli_panel(services, page, "eval", lambda form: {})
    with gr.Tab("Predict"):
        def predictions_path(form: dict[str, Any], extra: tuple[Any, ...]) -> dict[str, Any]:
            if not str(form.get("out") or "").strip() and form.get("run"):
                form["out"] = str(runs_dir / str(form["run"]) / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            return form

        cli_panel(services, page, "predict", lambda form: {"predictions": str(form["out"])}, prepare=predictions_path)


def build_export(services: Services, page: gr.Blocks) -> None:
    cli_panel(services, page, "export", lambda form: {"export": str(form["out"])})


def build_compare(services: Services, page: gr.Blocks, train_yaml: gr.Code) -> None:
    gr.Markdown("Trains every listed method on the job below (same data, steps and seed) and tabulates cost and "
                "gain. The config starts as the Train tab's; it needs an eval set (data.eval or data.eval_split).")
    config = gr.Code(language="yaml", label="config (the job every method runs)", interactive=True,
                     lines=12, max_lines=CODE_LINES, elem_id="compare-config")
    copy = gr.Button("Use the Train tab's config", elem_id="compare-copy")
    copy.click(lambda text: text, train_yaml, config)
    default_out = services.runs.runs_dir / "compare"

    def write_config(form: dict[str, Any], extra: tuple[Any, ...]) -> dict[str, Any]:
        out = Path(str(form.get("out") or default_out))
        if not str(extra[0] or "").strip():
            raise TunelabError("the compare config is empty: press \"Use the Train tab's config\" or write one.")
        write_text(out / "compare.yaml", str(extra[0]))
        return {**form, "out": str(out), "config": str(out / "compare.yaml")}

    cli_panel(services, page, "compare", lambda form: {"compare": str(form["out"])}, hidden=("config",),
              extra_inputs=(config,), prepare=write_config, initial={"out": str(default_out)})
