"""Screenshots of every web UI view, for docs/webui/ (the README shows them).

    python scripts/webui_screenshots.py [--out docs/webui] [--model tiny|smollm2]

Starts ``tunelab webui`` on a scratch runs directory, trains two runs on examples/data
through the JSON API (two learning rates, so the Runs view overlays two curves), then
drives Debian's chromium (playwright, no browser download) through each view as a user
would: fills the Train form and previews the data and the memory estimate, watches the
runs, chats with a run beside its base model, evaluates, exports, and compares two methods.
``--model tiny`` (default) uses a 2-layer random model, fast on any CPU; ``smollm2`` the
embedded SmolLM2-135M-Instruct (minutes on a laptop CPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from tunelab.webui.driver import UIServer, choose, type_into, wait_until

ROOT = Path(__file__).resolve().parent.parent
#: Per model: its name or directory (None: built here), learning rate, steps.
MODELS = {"tiny": (None, 1e-2, 150), "smollm2": ("smollm2-135m-instruct", 1e-3, 24)}


def api(server: UIServer, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(server.url + path.lstrip("/"), method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def run_config(model: str, lr: float, steps: int) -> dict:
    return {"model": {"name_or_path": model}, "method": {"type": "lora", "r": 8},
            "data": {"dataset_dir": "data", "train": ["identity"], "eval": ["identity_eval"], "max_length": 128},
            "train": {"max_steps": steps, "batch_size": 4, "lr": lr, "eval_every": max(steps // 5, 1),
                      "precision": "fp32"}}


def train_runs(server: UIServer, model: str, lr: float, steps: int) -> list[str]:
    ids = [api(server, "/api/runs", {"config": run_config(model, rate, steps), "name": name})["id"]
           for name, rate in (("identity-lora", lr), (f"identity-lora-lr{lr / 4:g}", lr / 4))]
    for run_id in ids:
        wait_until(lambda: api(server, f"/api/runs/{run_id}")["status"] in ("finished", "failed"), f"run {run_id}")
    return ids


def job_done(page, command: str) -> bool:
    status = page.locator(f"#{command}-status").inner_text()
    if "failed" in status:
        raise RuntimeError(f"tunelab {command} failed: {page.locator(f'#{command}-log').inner_text()[-800:]}")
    return "finished" in status


def shoot(page, tab: str, out: Path, name: str) -> None:
    page.get_by_role("tab", name=tab).click()
    page.wait_for_timeout(2500)  # a refresh tick
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    print(f"wrote {out / f'{name}.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "webui")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tunelab-webui-"))
    shutil.copytree(ROOT / "examples" / "data", work / "data")
    model, lr, steps = MODELS[args.model]
    if model is None:
        from tunelab.testing.tiny import save_tiny_model_dir

        model = str(save_tiny_model_dir(work / "tiny-model"))
    server = UIServer(work, work / "runs")
    server.start()
    try:
        run_id, other = train_runs(server, model, lr, steps)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(600_000)
            page.goto(server.url)

            type_into(page, "cfg-model-name_or_path", model)
            choose(page, "cfg-data-train", "identity")
            choose(page, "cfg-data-eval", "identity_eval")
            type_into(page, "cfg-train-max_steps", "8")
            page.locator("#train-preview").click()
            page.locator("#train-estimate").click()
            wait_until(lambda: "predicted peak memory" in page.locator("#train-memory").inner_text(),
                       "the memory estimate")
            shoot(page, "Train", args.out, "train")

            page.get_by_role("tab", name="Runs").click()
            choose(page, "runs-run", run_id)
            choose(page, "runs-overlay", other)
            shoot(page, "Runs", args.out, "runs")

            page.get_by_role("tab", name="Chat").click()
            choose(page, "chat-run", run_id)
            choose(page, "chat-right", "base")
            page.locator("#chat-input textarea").fill("Who are you?")
            page.locator("#chat-input textarea").press("Enter")
            wait_until(lambda: page.locator("#chat-right-box .bot").count()
                       and not page.locator("#chat-input textarea").input_value(), "the answers")
            page.wait_for_timeout(5000)
            shoot(page, "Chat", args.out, "chat")

            page.get_by_role("tab", name="Evaluate & predict").click()
            choose(page, "eval-run", run_id)
            type_into(page, "eval-task", "perplexity")
            type_into(page, "eval-data", str(work / "data" / "identity_eval.json"))
            page.locator("#eval-compare_base input").check()
            page.locator("#eval-launch").click()
            wait_until(lambda: job_done(page, "eval"), "the evaluation")
            shoot(page, "Evaluate & predict", args.out, "evaluate")

            page.get_by_role("tab", name="Export").click()
            choose(page, "export-run", run_id)
            type_into(page, "export-out", str(work / "merged"))
            page.locator("#export-launch").click()
            wait_until(lambda: job_done(page, "export"), "the export")
            shoot(page, "Export", args.out, "export")

            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare-copy").click()
            type_into(page, "compare-methods", "lora,ia3")
            page.locator("#compare-launch").click()
            wait_until(lambda: job_done(page, "compare"), "the comparison")
            shoot(page, "Compare", args.out, "compare")
            browser.close()
    finally:
        server.kill()
        print(f"scratch directory: {work}")


if __name__ == "__main__":
    main()
