"""The JSON API: the contract scripts and tests use, over the same service the UI calls.

``GET /api/runs`` (a list of runs), ``POST /api/runs`` (``{"config": {...}, "name"?: str}`` -> ``{"id"}``),
``GET /api/runs/{id}`` (``status, step, total_steps, metrics`` and more),
``GET /api/runs/{id}/metrics`` (the rows of metrics.jsonl), ``POST /api/runs/{id}/stop``,
``POST /api/runs/{id}/resume``. Errors are ``{"error": message}``: 400 for an invalid
config (the message ``tunelab train`` prints for it), 404 for an unknown run, 409 for a
request the run's state does not allow.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from tunelab.errors import TunelabError
from tunelab.webui.service import RunService, RunStateError, UnknownRun


def error_response(err: TunelabError) -> JSONResponse:
    status = 404 if isinstance(err, UnknownRun) else 409 if isinstance(err, RunStateError) else 400
    return JSONResponse({"error": str(err)}, status_code=status)


def api_router(runs: RunService) -> APIRouter:
    router = APIRouter(prefix="/api")

    async def call(fn: Any, *args: Any) -> Any:
        """Run a service call off the event loop (it reads files); user errors become JSON errors."""
        try:
            return await run_in_threadpool(fn, *args)
        except TunelabError as err:
            return error_response(err)

    def as_dict(result: Any) -> Any:
        return result if isinstance(result, JSONResponse) else result.to_dict()

    @router.get("/runs")
    async def list_runs() -> Any:
        views = await call(runs.list)
        return views if isinstance(views, JSONResponse) else [view.to_dict() for view in views]

    @router.post("/runs")
    async def create_run(config: dict[str, Any] = Body(..., embed=True), name: str | None = Body(None)) -> Any:
        run_id = await call(runs.submit, config, name)
        return run_id if isinstance(run_id, JSONResponse) else {"id": run_id}

    @router.get("/runs/{run_id}")
    async def get_run(run_id: str) -> Any:
        return as_dict(await call(runs.view, run_id))

    @router.get("/runs/{run_id}/metrics")
    async def get_metrics(run_id: str) -> Any:
        return await call(runs.metrics, run_id)

    @router.post("/runs/{run_id}/stop")
    async def stop_run(run_id: str) -> Any:
        return as_dict(await call(runs.stop, run_id))

    @router.post("/runs/{run_id}/resume")
    async def resume_run(run_id: str) -> Any:
        return as_dict(await call(runs.resume, run_id))

    return router
