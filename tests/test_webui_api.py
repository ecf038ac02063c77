"""The web UI's JSON API and the services behind it: detached runs, the on-disk queue, stop/resume, jobs,
chat, the generated config form, and the API key."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tunelab.cli import app as cli_app  # noqa: E402
from tunelab.config import build_config  # noqa: E402
from tunelab.data.records import Message  # noqa: E402
from tunelab.errors import ConfigError, TunelabError  # noqa: E402
from tunelab.inference import GenerationOptions, GenerationRow, complete, encode_prompt, load_run  # noqa: E402
from tunelab.runs import RunDir, list_runs  # noqa: E402
from tunelab.webui import webui_main  # noqa: E402
from tunelab.webui.app import create_app  # noqa: E402
from tunelab.webui.auth import COOKIE  # noqa: E402
from tunelab.webui.chat import BASE, ChatService  # noqa: E402
from tunelab.webui.cli_form import build_argv, command_params  # noqa: E402
from tunelab.webui.form import (config_tree, defaults, field_by_key, follow_defaults, parse_widget,  # noqa: E402
                                visible_keys, widget_value)
from tunelab.webui.jobs import JobService  # noqa: E402
from tunelab.webui.preview import SUPERVISED, preview  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
TIMEOUT_S = 120


def tiny_config(model_dir, **train):
    return {"model": {"name_or_path": str(model_dir)},
            "method": {"type": "lora", "r": 4},
            "data": {"dataset_dir": str(FIXTURES), "train": ["identity"], "max_length": 96},
            "train": {"batch_size": 2, "lr": 5e-3, "precision": "fp32", **train}}


def wait_for(client, run_id, done, what):
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        view = client.get(f"/api/runs/{run_id}").json()
        if done(view):
            return view
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} never {what}: {view}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("webui") / "runs"
    with TestClient(create_app(runs_dir, cli_app)) as client:
        yield client, runs_dir
    for run in list_runs(runs_dir):  # never leave a training process behind
        status = run.read_status()
        if status is not None and status.status == "running":
            os.kill(status.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def finished_run(server, tiny_model_dir):
    client, runs_dir = server
    reply = client.post("/api/runs", json={"config": tiny_config(tiny_model_dir, max_steps=8, lr=1e-2),
                                           "name": "tiny"})
    assert reply.status_code == 200, reply.text
    view = wait_for(client, reply.json()["id"], lambda v: v["status"] in ("finished", "failed"), "finished")
    assert view["status"] == "finished", view
    return reply.json()["id"], runs_dir


# ---------------------------------------------------------------------------- runs API

def test_a_run_posted_to_the_api_trains_detached_and_reports_its_metrics(server, finished_run):
    client, _ = server
    run_id, runs_dir = finished_run
    view = client.get(f"/api/runs/{run_id}").json()
    assert (view["status"], view["step"], view["total_steps"]) == ("finished", 8, 8)
    rows = client.get(f"/api/runs/{run_id}/metrics").json()
    assert rows == RunDir(runs_dir / run_id).read_metrics()
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 9))
    assert view["metrics"]["loss"] == rows[-1]["loss"]
    assert run_id in [run["id"] for run in client.get("/api/runs").json()]
    saved = yaml.safe_load((runs_dir / run_id / "config.yaml").read_text())
    assert saved["output_dir"] == str(runs_dir / run_id) and saved["method"]["r"] == 4


def test_an_invalid_config_gets_400_with_the_message_the_cli_prints(server, tmp_path):
    client, _ = server
    tree = {"train": {"lrr": 1e-3}}
    reply = client.post("/api/runs", json={"config": tree})
    assert reply.status_code == 400
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    printed = CliRunner().invoke(cli_app, ["train", str(path)]).output
    assert "Did you mean 'train.lr'" in reply.json()["error"]
    assert " ".join(printed.split()) == " ".join(f"error: {reply.json()['error']}".replace("config:", f"{path}:", 1)
                                                 .split())


def test_unknown_runs_are_404_and_stopping_a_finished_run_is_409(server, finished_run):
    client, _ = server
    assert client.get("/api/runs/nope").status_code == 404
    assert client.get("/api/runs/..%2Fetc").status_code == 404
    reply = client.post(f"/api/runs/{finished_run[0]}/stop")
    assert reply.status_code == 409 and "nothing to stop" in reply.json()["error"]


def test_runs_queue_one_at_a_time_and_stop_and_resume_from_a_checkpoint(server, tiny_model_dir):
    client, runs_dir = server
    long = client.post("/api/runs", json={"config": tiny_config(tiny_model_dir, max_steps=5000, save_every=1000000),
                                          "name": "long"}).json()["id"]
    waiting = client.post("/api/runs", json={"config": tiny_config(tiny_model_dir, max_steps=2),
                                             "name": "waiting"}).json()["id"]
    wait_for(client, long, lambda v: v["status"] == "running" and v["step"] >= 2, "ran")
    assert client.get(f"/api/runs/{waiting}").json()["status"] == "queued"  # one run at a time
    assert client.post(f"/api/runs/{waiting}/stop").json()["status"] == "stopped"  # cancelled before it started
    assert client.post(f"/api/runs/{long}/stop").status_code == 200  # SIGTERM: checkpoint, then exit
    stopped = wait_for(client, long, lambda v: v["status"] != "running", "stopped")
    assert stopped["status"] == "stopped"
    checkpoint = RunDir(runs_dir / long).latest_checkpoint()
    assert checkpoint is not None and checkpoint.name == f"step-{stopped['step']}"
    assert client.post(f"/api/runs/{long}/resume").json()["status"] in ("queued", "running")
    resumed = wait_for(client, long, lambda v: v["status"] == "running" and v["step"] > stopped["step"], "resumed")
    assert resumed["step"] > stopped["step"]
    assert client.post(f"/api/runs/{long}/stop").status_code == 200
    wait_for(client, long, lambda v: v["status"] == "stopped", "stopped again")
    steps = [row["step"] for row in RunDir(runs_dir / long).read_metrics()]
    assert steps[0] == 1 and steps == sorted(set(steps))  # resumed: one history, no step twice
    assert client.get(f"/api/runs/{waiting}").json()["status"] == "stopped"  # never started


def test_queued_runs_know_their_place_and_names_never_collide(tmp_path, tiny_model_dir, monkeypatch):
    from tunelab.webui.queue import RunQueue
    from tunelab.webui.service import RunService

    monkeypatch.setattr(RunQueue, "ensure_worker", lambda self: None)  # no worker: they stay queued
    runs = RunService(tmp_path)
    first = runs.submit(tiny_config(tiny_model_dir, max_steps=2))
    second = runs.submit(tiny_config(tiny_model_dir), name=first)
    assert first.startswith("sft-lora-") and second == f"{first}-2"
    assert [runs.view(i).queue_position for i in (first, second)] == [1, 2]
    runs.stop(first)
    assert runs.view(second).queue_position == 1
    (tmp_path / first / "status.json").write_text("{not json")  # one damaged run does not hide the others
    assert [(v.id, v.status) for v in runs.list()] == [(second, "queued"), (first, "failed")]
    assert "status.json" in runs.view(first).error


def test_a_resume_queued_before_the_worker_clears_the_ended_launch_reads_as_queued(tmp_path):
    from tunelab.io import write_json
    from tunelab.webui.queue import RunQueue

    ended = subprocess.Popen(["true"])
    ended.wait()
    queue = RunQueue(tmp_path)
    write_json(queue.dir / f"{0:020d}-r.json", {"id": "r", "resume": False, "queued_at": "", "pid": ended.pid})
    queue.put("r", resume=True)
    entry = queue.find("r")
    assert entry.resume and not entry.launched and queue.position("r") == 1


# ---------------------------------------------------------------------------- chat, jobs, preview

def test_chat_streams_the_runs_answer_and_the_bases_from_one_module(finished_run):
    run_id, runs_dir = finished_run
    chat = ChatService(runs_dir)
    messages = [Message("user", "Who are you?")]
    options = GenerationOptions(max_new_tokens=8, temperature=0.0)
    tuned = list(chat.stream(run_id, run_id, messages, options))
    base = "".join(chat.stream(run_id, BASE, messages, options))
    loaded = load_run(runs_dir / run_id)

    def answer() -> str:
        return complete(loaded, [GenerationRow(encode_prompt(loaded, messages), options)])[0].text

    assert len(tuned) > 1 and "".join(tuned) == answer()  # streamed piece by piece
    with loaded.method.reference(loaded.model) as plain:  # the same module with the adapter switched off
        loaded.model = plain
        assert base == answer() != "".join(tuned)


def test_jobs_run_cli_commands_detached_and_record_their_exit_code(tmp_path):
    jobs = JobService(tmp_path)
    ok = jobs.start(["config-keys"])
    bad = jobs.start(["train", str(tmp_path / "missing.yaml")])
    deadline = time.time() + TIMEOUT_S
    while {jobs.view(ok).status, jobs.view(bad).status} & {"running"} and time.time() < deadline:
        time.sleep(0.3)
    assert (jobs.view(ok).status, jobs.view(ok).returncode) == ("finished", 0)
    assert "train.lr" in jobs.log_tail(ok, 400)
    assert (jobs.view(bad).status, jobs.view(bad).returncode) == ("failed", 2)
    assert "error:" in jobs.log_tail(bad)
    assert [job.id for job in jobs.list("train")] == [bad]


def test_cli_forms_follow_the_command_options():
    params = command_params(cli_app, "eval")
    assert {"run", "task", "data", "compare_base", "max_samples"} <= {p.name for p in params}
    argv = build_argv("eval", params, {"run": "runs/a", "task": "perplexity", "data": "d.jsonl",
                                       "compare_base": True, "batch_size": 8.0, "max_samples": None})
    assert argv == ["eval", "runs/a", "--task", "perplexity", "--data", "d.jsonl", "--compare-base"]
    with pytest.raises(TunelabError, match="--data is required"):
        build_argv("eval", params, {"run": "runs/a", "task": "perplexity"})


def test_preview_highlights_exactly_the_trained_answer(tiny_model_dir):
    cfg = build_config(tiny_config(tiny_model_dir))
    first = preview(cfg, "identity", count=2)[0]
    record = json.loads((FIXTURES / "identity.json").read_text())[0]
    supervised = "".join(text for text, label in first if label == SUPERVISED)
    assert supervised.startswith(record["output"]) and record["instruction"] not in supervised
    assert record["instruction"] in "".join(text for text, _ in first)


# ---------------------------------------------------------------------------- the generated form

def test_the_form_shows_each_method_types_own_keys_and_each_stages_sections():
    lora, houlsby = visible_keys("lora", "sft"), visible_keys("houlsby", "sft")
    assert "method.r" in lora and "method.r" not in houlsby and "method.reduction_factor" in houlsby
    assert not any(key.startswith("pref.") for key in lora)
    assert "pref.beta" in visible_keys("lora", "dpo") and "ppo.kl_coef" not in visible_keys("lora", "dpo")
    assert "ppo.kl_coef" in visible_keys("lora", "ppo")


@pytest.mark.parametrize("method_type", ["lora", "houlsby", "prefix", "full", "ia3"])
def test_untouched_fields_give_the_shortest_config_and_edits_round_trip(method_type):
    fields = field_by_key()
    base = defaults(method_type, "sft")
    untouched = {key: widget_value(fields[key], base[key]) for key in base if key in fields}
    assert config_tree(untouched, method_type, "sft") == {"stage": "sft", "method": {"type": method_type}}
    edited = {**untouched, "train.max_steps": "7", "data.train": '["identity"]', "train.adam_betas": "[0.8, 0.9]"}
    tree = config_tree(edited, method_type, "sft")
    cfg = build_config(tree)
    assert (cfg.train.max_steps, cfg.data.train, cfg.train.adam_betas) == (7, ["identity"], (0.8, 0.9))
    assert all(parse_widget(fields[k], widget_value(fields[k], v)) == v for k, v in base.items() if k in fields)


def test_switching_method_moves_untouched_defaults_and_keeps_edits():
    fields = field_by_key()
    base = defaults("lora", "sft")
    values = {key: widget_value(fields[key], base[key]) for key in base if key in fields}
    moved = follow_defaults({**values, "train.batch_size": 2}, ("lora", "sft"), ("full", "sft"))
    full_lr = defaults("full", "sft")["train.lr"]
    assert parse_widget(fields["train.lr"], moved["train.lr"]) == full_lr != base["train.lr"]  # each family's lr
    assert moved["train.batch_size"] == 2


def test_a_form_config_with_a_bad_value_is_the_cli_error():
    with pytest.raises(ConfigError, match="train.max_steps"):
        build_config(config_tree({"train.max_steps": "-3"}, "lora", "sft"))


# ---------------------------------------------------------------------------- security

def test_an_api_key_guards_the_api_and_the_page_and_a_browser_signs_in(tmp_path):
    with TestClient(create_app(tmp_path / "runs", cli_app, api_key="s3cret")) as client:
        assert client.get("/api/runs").status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).json() == []
        page = client.get("/", headers={"Accept": "text/html"}, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert client.get("/config").status_code == 401  # Gradio's own routes too
        assert client.post("/login", data={"key": "nope"}).status_code == 401
        signed_in = client.post("/login", data={"key": "s3cret"}, follow_redirects=False)
        assert signed_in.status_code == 303 and COOKIE in signed_in.cookies
        assert "s3cret" not in signed_in.headers["set-cookie"]
        assert client.get("/api/runs").status_code == 200  # the session cookie
        assert client.get("/").status_code == 200


def test_listing_beyond_localhost_requires_an_api_key(tmp_path):
    with pytest.raises(ConfigError, match="--api-key"):
        webui_main("0.0.0.0", 7860, tmp_path, None, cli_app)
