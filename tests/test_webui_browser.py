"""The web UI in a real headless Chromium (Debian's ``chromium``, driven by playwright; no browser download):
start a tiny run from the Train view, watch its curve grow in the Runs view, kill and restart the UI server
mid-run and see the run finish with its curves complete, then chat with it beside its base model."""

import os
import shutil
import signal
from pathlib import Path

import pytest

pytest.importorskip("gradio")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed; scripts/test.sh "
                                                         "installs it (apt-get install -y chromium) when run as root")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from tunelab.data.records import Message  # noqa: E402
from tunelab.inference import GenerationOptions, GenerationRow, complete, encode_prompt, load_run  # noqa: E402
from tunelab.runs import RunDir, list_runs  # noqa: E402
from tunelab.webui.driver import WAIT_S, UIServer, choose, metric_points, type_into, wait_until, words  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
STEPS = 500  # the run memorises its three answers; it is frozen (SIGSTOP) while the server restarts
PROMPT = "Who are you?"
MAX_NEW_TOKENS = 128  # the Chat view's default


@pytest.fixture
def ui(tmp_path, tiny_model_dir):
    shutil.copytree(FIXTURES, tmp_path / "data")  # the form's default data.dataset_dir is ./data
    server = UIServer(tmp_path, tmp_path / "runs")
    server.start()
    yield server
    server.kill()
    for run in list_runs(server.runs_dir):  # never leave a training process behind
        status = run.read_status()
        if status is not None and status.status == "running":
            os.kill(status.pid, signal.SIGKILL)


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_train_watch_survive_a_server_restart_and_chat(ui, browser, tiny_model_dir):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_S * 1000)
    page.goto(ui.url)

    # Train: fill the generated form and start.
    type_into(page, "cfg-model-name_or_path", str(tiny_model_dir))
    choose(page, "cfg-data-train", "identity")
    type_into(page, "cfg-data-max_length", "96")
    type_into(page, "cfg-train-max_steps", str(STEPS))
    type_into(page, "cfg-train-batch_size", "2")
    type_into(page, "cfg-train-lr", "0.01")
    choose(page, "cfg-train-precision", "fp32")
    type_into(page, "train-name", "browser-run")
    wait_until(lambda: f"max_steps: {STEPS}" in page.locator("#train-yaml").inner_text(), "the YAML to follow the form")
    page.locator("#train-start").click()
    wait_until(lambda: "browser-run" in page.locator("#train-message").inner_text(), "the run to be queued")
    run = RunDir(ui.runs_dir / "browser-run")

    # Runs: the curve grows while the run trains.
    page.get_by_role("tab", name="Runs").click()
    first = wait_until(lambda: metric_points(page), "the first loss point")
    grown = wait_until(lambda: metric_points(page) > first and metric_points(page), "the loss curve to grow")
    assert grown > first
    assert page.locator("#runs-plot img").count() == 1

    # Kill the server mid-run: the run goes on; a new server re-attaches to it. The training process is
    # frozen meanwhile, so that a fast machine cannot finish the run before the server is gone.
    status = run.read_status()
    os.kill(status.pid, signal.SIGSTOP)
    try:
        status = run.read_status()
        assert status.status == "running" and status.step < STEPS, f"the run ended before it was frozen ({status})"
        ui.kill()
        ui.start()
        page.reload()
        page.get_by_role("tab", name="Runs").click()
        wait_until(lambda: "running" in page.locator("#runs-detail").inner_text(), "the new server to see the run")
    finally:
        os.kill(status.pid, signal.SIGCONT)
    wait_until(lambda: "finished" in page.locator("#runs-detail").inner_text(), "the run to finish")
    wait_until(lambda: metric_points(page) == STEPS, "the complete curve")
    assert [row["step"] for row in run.read_metrics() if "loss" in row] == list(range(1, STEPS + 1))

    # Chat: the tuned run beside its base, streamed into the page.
    loaded = load_run(run.root)
    messages = [Message("user", PROMPT)]
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, seed=0)
    tuned = complete(loaded, [GenerationRow(encode_prompt(loaded, messages), options)])[0].text
    with loaded.method.reference(loaded.model) as plain:
        loaded.model = plain
        base = complete(loaded, [GenerationRow(encode_prompt(loaded, messages), options)])[0].text
    page.get_by_role("tab", name="Chat").click()
    choose(page, "chat-run", "browser-run")
    choose(page, "chat-right", "base")
    page.locator("#chat-input textarea").fill(PROMPT)
    page.locator("#chat-input textarea").press("Enter")
    left = page.locator("#chat-left-box .bot")
    right = page.locator("#chat-right-box .bot")
    wait_until(lambda: left.count() and words(left.last.inner_text()) == words(tuned), "the run's answer")
    wait_until(lambda: right.count() and words(right.last.inner_text()) == words(base), "the base model's answer")
    assert words(tuned) != words(base)
    assert "Tunebot" in tuned  # the tuned run answers with what it was trained on
