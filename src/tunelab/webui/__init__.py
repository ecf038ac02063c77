"""``tunelab webui``: the whole workflow in a browser, over runs that outlive it.

Modules: :mod:`service` (runs: list, start, stop, resume, read), :mod:`queue` (the on-disk
run queue and its worker), :mod:`jobs` (eval/predict/export/compare launched as detached
CLI processes), :mod:`chat` (streamed chat on the serving engine), :mod:`form` and
:mod:`cli_form` (forms generated from the config schema and from the CLI's options),
:mod:`preview`, :mod:`plots`, :mod:`api` (JSON API), :mod:`auth` (API key), :mod:`app`
and :mod:`views` (the Gradio page); :mod:`driver` drives the page from a browser (tests,
screenshots). Only :mod:`app`, :mod:`views`, :mod:`api` and :mod:`auth` import Gradio or
FastAPI, so the queue worker and the job wrapper start light.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, TunelabError

_PACKAGES = ("gradio", "fastapi", "uvicorn")


def webui_main(host: str, port: int, runs_dir: str | Path, api_key: str | None, cli: Any) -> None:
    """Serve the web UI until interrupted. Listening beyond this machine requires an API key.

    ``cli`` is the ``tunelab`` typer app, whose commands the Evaluate, Export and Compare
    views build their forms from and launch.
    """
    from tunelab.webui.auth import LOCAL_HOSTS

    missing = [name for name in _PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise TunelabError(f"tunelab webui needs {', '.join(missing)}, which is not installed. Install the web UI "
                           "extra with: pip install 'tunelab[webui]'")
    if host not in LOCAL_HOSTS and not api_key:
        raise ConfigError(f"--host {host} makes the web UI (and the runs, data and models it reaches) reachable "
                          "from other machines, so it needs a key: pass --api-key KEY (or set TUNELAB_API_KEY). "
                          "Browsers then sign in at /login; scripts send 'Authorization: Bearer KEY'.")
    import uvicorn

    from tunelab.webui.app import create_app

    print(f"tunelab web UI on http://{host}:{port} (runs in {Path(runs_dir).resolve()})", flush=True)
    uvicorn.run(create_app(runs_dir, cli, api_key), host=host, port=port, log_level="warning")
