"""The web UI server: one FastAPI app serving the JSON API and the Gradio page over the same services."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI

from tunelab.webui.api import api_router
from tunelab.webui.auth import KeyGuard, login_router
from tunelab.webui.views import chat, runs, tools, train
from tunelab.webui.views.common import CSS, Services

TITLE = "tunelab"


def build_page(services: Services) -> gr.Blocks:
    """The Gradio page: one tab per view."""
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"## tunelab · runs in `{services.runs.runs_dir}`")
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train_yaml = train.build(services)
            with gr.Tab("Runs", id="runs"):
                runs.build(services)
            with gr.Tab("Chat", id="chat"):
                chat.build(services, page)
            with gr.Tab("Evaluate & predict", id="evaluate"):
                tools.build_evaluate(services, page)
            with gr.Tab("Export", id="export"):
                tools.build_export(services, page)
            with gr.Tab("Compare", id="compare"):
                tools.build_compare(services, page, train_yaml)
    return page


def create_app(runs_dir: str | Path, cli: Any, api_key: str | None = None) -> FastAPI:
    """The whole server; ``cli`` is the ``tunelab`` typer app; with ``api_key`` every route but /login requires it."""
    services = Services.open(runs_dir, cli)
    services.runs.reattach()
    app = FastAPI(title="tunelab web UI")
    app.include_router(api_router(services.runs))
    if api_key:
        app.include_router(login_router(api_key))
    # allowed_paths: result images (compare.png) live in the runs directory, wherever it is
    app = gr.mount_gradio_app(app, build_page(services), path="/", ssr_mode=False, css=CSS,
                              allowed_paths=[str(services.runs.runs_dir)])
    if api_key:
        app.add_middleware(KeyGuard, api_key=api_key)
    return app
