"""Runs: every run with its status, live curves of every metric (runs overlaid), log tail, config, stop/resume.

Everything shown is re-read from the runs directory on each refresh, so a refreshed page,
a second browser, or a restarted server shows the same thing.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from tunelab.errors import TunelabError
from tunelab.webui.plots import figure, summary
from tunelab.webui.service import RunView
from tunelab.webui.views.common import CODE_LINES, LOG_CLASS, LOG_LINES, REFRESH_S, Services, failure

TABLE_HEADERS = ["run", "status", "step", "of", "loss", "eval_loss", "started", "updated"]


def _number(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else value)


def table_rows(views: list[RunView]) -> list[list[Any]]:
    return [[v.id, v.status + (f" (#{v.queue_position})" if v.queue_position else ""), v.step, v.total_steps or "",
             _number(v.metrics.get("loss")), _number(v.metrics.get("eval_loss")), v.started_at or "",
             v.updated_at or ""] for v in views]


def _detail(view: RunView) -> str:
    total = f" of {view.total_steps}" if view.total_steps else ""
    text = f"**{view.id}**: {view.status}, step {view.step}{total}"
    return text + (f"\n\n```\n{view.error}\n```" if view.error else "")


def build(services: Services) -> None:
    runs = services.runs
    timer = gr.Timer(REFRESH_S)
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="runs", elem_id="runs-table")
    with gr.Row():
        chosen = gr.Dropdown(label="run", choices=[], elem_id="runs-run", scale=2)
        overlay = gr.Dropdown(label="overlay other runs", choices=[], multiselect=True, elem_id="runs-overlay",
                              scale=3)
        stop_button = gr.Button("Stop", elem_id="runs-stop", scale=1)
        resume_button = gr.Button("Resume", elem_id="runs-resume", scale=1)
    detail = gr.Markdown(elem_id="runs-detail")
    plot = gr.Plot(label="metrics", elem_id="runs-plot")
    latest = gr.Dataframe(headers=["metric", "points", "last step", "last value"], interactive=False,
                          label="logged metrics", elem_id="runs-metrics")
    with gr.Row():
        log = gr.Textbox(label="train.log (tail)", lines=LOG_LINES, max_lines=LOG_LINES, elem_classes=[LOG_CLASS],
                         elem_id="runs-log")
        config = gr.Code(label="resolved config", language="yaml", interactive=False, max_lines=CODE_LINES,
                         elem_id="runs-config")
    drawn = gr.State(None)  # what the plot shows, to redraw only when a metrics file grew

    def refresh(run_id: str | None, others: list[str] | None, drawn_key: Any) -> list[Any]:
        views = runs.list()
        ids = [v.id for v in views]
        valid = run_id in ids
        run_id = run_id if valid else (ids[0] if ids else None)
        others = [o for o in (others or []) if o in ids and o != run_id]
        # Choices only (unless the chosen run is gone): setting values would undo a choice made during a refresh.
        chosen_update = gr.update(choices=ids) if valid else gr.update(choices=ids, value=run_id)
        updates: list[Any] = [table_rows(views), chosen_update, gr.update(choices=[i for i in ids if i != run_id])]
        if run_id is None:
            return updates + ["No runs yet: start one in the Train tab.", None, [], "", "", None]
        shown = [run_id, *others]
        series = {i: runs.metrics(i) for i in shown}
        key = [(i, len(rows), rows[-1] if rows else None) for i, rows in series.items()]
        view = next(v for v in views if v.id == run_id)
        redraw = key != drawn_key
        return updates + [_detail(view), figure(series) if redraw else gr.skip(), summary(series[run_id]),
                          runs.log_tail(run_id, LOG_LINES) or runs.console_tail(run_id, LOG_LINES),
                          runs.config_text(run_id), key]

    outputs = [table, chosen, overlay, detail, plot, latest, log, config, drawn]
    timer.tick(refresh, [chosen, overlay, drawn], outputs, show_progress="hidden")
    gr.on([chosen.input, overlay.input], refresh, [chosen, overlay, drawn], outputs, show_progress="hidden")

    def act(action: str, run_id: str | None) -> str:
        if not run_id:
            return "Choose a run first."
        try:
            view = runs.stop(run_id) if action == "stop" else runs.resume(run_id)
        except TunelabError as err:
            return failure(err)
        return _detail(view)

    stop_button.click(lambda run_id: act("stop", run_id), chosen, detail)
    resume_button.click(lambda run_id: act("resume", run_id), chosen, detail)
