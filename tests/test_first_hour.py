"""The first hour of a new user: version, chat session, progress, the summary line, setup, optional plots.

Each test pins one friction that a user met (issue 14) so it cannot come back; the README's
commands themselves are run by tests/test_readme_commands.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import tunelab
from tunelab.chat_repl import STOPPED, ChatSession, help_text, interactive
from tunelab.cli import app
from tunelab.data.records import Message
from tunelab.errors import ConfigError
from tunelab.evaluate import eval_main
from tunelab.inference import GenerationOptions, generate, load_run
from tunelab.predict import predict_file, prompts_and_references
from tunelab.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
GREEDY = GenerationOptions(max_new_tokens=12, temperature=0.0)
ANSWER = "I am Tuna, an assistant trained with tunelab."
runner = CliRunner()


def _alpaca(path: Path, pairs) -> Path:
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in pairs]))
    return path


@pytest.fixture(scope="module")
def tuna(tiny_model_dir, tmp_path_factory):
    """A tiny model fully fine-tuned until it answers ANSWER (a random tiny model only writes newlines).

    Its 8 examples are one record repeated, so every step has the same tokens: the run's
    token-weighted mean loss is then the plain mean of the logged step losses.
    """
    root = tmp_path_factory.mktemp("tuna")
    data = _alpaca(root / "same.json", [("Who are you?", ANSWER)] * 8)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)}, "method": {"type": "full"},
        "data": {"train": [str(data)], "max_length": 64},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 3e-3, "scheduler": "constant", "precision": "fp32"},
        "output_dir": str(root / "run")}))
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    return {"run": root / "run", "output": result.output}


@pytest.fixture(scope="module")
def loaded(tuna):
    return load_run(tuna["run"], device=torch.device("cpu"))


# ------------------------------------------------------------------------------ --version

def test_version_names_tunelab_and_the_libraries():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"tunelab {tunelab.__version__} (Python ")
    assert f"torch {torch.__version__}" in result.output


# ------------------------------------------------------------------------------ chat session

def _session(loaded, **options) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    return ChatSession(loaded, GenerationOptions(**{**vars(GREEDY), **options}), streaming=True, out=out), out


def _reader(lines):
    """``input()`` for a scripted session: each item is a line, or an exception to raise (Ctrl-C, Ctrl-D)."""
    items = iter(lines)

    def read(prompt: str) -> str:
        item = next(items, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_session_commands_are_handled_by_tunelab_not_the_model(loaded):
    session, out = _session(loaded)
    asked = []
    session.answer = lambda text: asked.append(text) or ""  # what would reach the model
    interactive(session, _reader(["/help", "Who are you?", "/reset", "/nonsense", "//etc is a path", "/exit",
                                  "never read"]))
    text = out.getvalue()
    assert text.startswith(f"tunelab chat with {loaded.source} (full on {loaded.cfg.model.name_or_path}, stage sft)"
                           "\ndecoding: greedy, up to 12 new tokens")
    assert "/help lists the commands" in text and "Ctrl-C stops an answer" in text
    assert help_text() in text and "(new conversation)" in text
    assert "unknown command /nonsense" in text
    assert asked == ["Who are you?", "/etc is a path"]


def test_reset_keeps_the_system_prompt_and_drops_the_turns(loaded):
    session, _ = _session(loaded)
    session.system = "Be brief."
    session.reset()
    assert session.history == [Message("system", "Be brief.")]
    session.history += [Message("user", "Hi"), Message("assistant", "Hello")]
    interactive(session, _reader(["/reset", "/exit"]))
    assert session.history == [Message("system", "Be brief.")]


def test_ctrl_c_at_the_prompt_twice_ends_the_session_once_warns(loaded):
    session, out = _session(loaded)
    asked = []
    session.answer = lambda text: asked.append(text) or ""
    interactive(session, _reader([KeyboardInterrupt(), "hello", KeyboardInterrupt(), KeyboardInterrupt(), "late"]))
    assert out.getvalue().count("press Ctrl-C again") == 2
    assert asked == ["hello"]  # the first Ctrl-C did not end it; two in a row did, before "late"


def test_ctrl_c_during_an_answer_stops_that_answer_not_the_session(tiny_model_dir):
    """A real SIGINT while the answer streams: generation is cancelled at once, the session goes on."""
    loaded = load_run(tiny_model_dir, device=torch.device("cpu"))  # with a repetition penalty it writes on and on
    session, out = _session(loaded, max_new_tokens=300, repetition_penalty=5.0)
    main, forwards = threading.main_thread().ident, []

    def forward_then_ctrl_c(module, args):  # one call per generated token (the first is the prompt)
        forwards.append(module)
        if len(forwards) == 10:
            signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C, delivered to the session's thread
        time.sleep(0.01)

    hook = loaded.model.register_forward_pre_hook(forward_then_ctrl_c)
    # Python's own Ctrl-C handler, as in a terminal (a shell's background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threads = set(threading.enumerate())  # other tests' threads may end meanwhile: only new ones count
    try:
        partial_answer = session.answer("Who are you?")
    finally:
        hook.remove()
        signal.signal(signal.SIGINT, previous)
    assert session.stopped and out.getvalue().rstrip().endswith(STOPPED)
    assert len(forwards) < 20, "generation must stop at the next token, not run on to 300"
    assert set(threading.enumerate()) <= threads, "the generating thread must have ended with the answer"
    assert session.history[-2:] == [Message("user", "Who are you?"), Message("assistant", partial_answer)]
    assert session.answer("And now?") and not session.stopped  # the session still answers


def test_one_shot_answer_is_the_greedy_answer(loaded):
    session, out = _session(loaded)
    answer = session.answer("Who are you?")
    assert answer.startswith(ANSWER) and answer == generate(loaded, [[Message("user", "Who are you?")]], GREEDY)[0]
    assert out.getvalue().strip() == answer and out.getvalue().endswith("\n")


# ------------------------------------------------------------------------------ progress

@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setattr("tunelab.progress.on_terminal", lambda: True)


def test_predict_shows_progress_on_a_terminal_only(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = _alpaca(tmp_path / "q.json", [("Hi", "Hello"), ("Who?", "Tuna"), ("Sea?", "Waves")])
    predict_file(str(tiny_model_dir), data, tmp_path / "a.jsonl", GREEDY, batch_size=2, progress=True)
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal
    monkeypatch.setattr("tunelab.progress.on_terminal", lambda: True)
    predict_file(str(tiny_model_dir), data, tmp_path / "b.jsonl", GREEDY, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""  # --quiet
    predict_file(str(tiny_model_dir), data, tmp_path / "c.jsonl", GREEDY, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "predict:" in err and "/3 [" in err and "prompt/s" in err  # the bar counts prompts (redrawn ~10/s)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "c.jsonl").read_text()


def test_eval_shows_progress_per_model(tuna, capsys, terminal):
    eval_main(str(tuna["run"]), "choice", str(EXAMPLES / "mc_demo.csv"), True, 0, None, 8, 4, progress=True)
    err = capsys.readouterr().err
    assert "choice (tuned):" in err and "choice (base):" in err and "/40 [" in err


# ------------------------------------------------------------------------------ eval --stop / --num-beams

def test_eval_generation_takes_stop_strings_and_beams(tuna, tmp_path, loaded):
    data = _alpaca(tmp_path / "g.json", [("Who are you?", "Tuna"), ("What is the capital of France?", "Paris")])
    chats = [[Message("user", "Who are you?")], [Message("user", "What is the capital of France?")]]

    def predictions(**kw):
        result = eval_main(str(tuna["run"]), "generation", str(data), False, 0, None, 2, 12, **kw)
        return [json.loads(line)["prediction"] for line in Path(result["files"]["predictions"]).read_text().splitlines()]

    plain = predictions()
    assert plain == generate(loaded, chats, GREEDY) and plain[0].startswith(ANSWER)
    assert predictions(stop=["Tuna", "Paris"]) == ["I am"] * 2
    beams = predictions(num_beams=3)
    assert beams == generate(loaded, chats, GenerationOptions(max_new_tokens=12, temperature=0.0, num_beams=3))


def test_stop_and_beams_are_refused_where_nothing_is_generated(tiny_model_dir):
    with pytest.raises(ConfigError, match="--stop and --num-beams .* --task generation only"):
        eval_main(str(tiny_model_dir), "choice", str(EXAMPLES / "mc_demo.csv"), False, 0, None, 8, 4,
                  num_beams=2)


# ------------------------------------------------------------------------------ predict with tools

def test_predict_offers_each_record_its_tools(tuna, tmp_path, loaded):
    prompt = prompts_and_references(EXAMPLES / "tools_demo.json", max_samples=1)[0]
    assert prompt.tools and prompt.tools[0]["function"]["name"] == "get_weather"
    with_tools = loaded.render_prompt(prompt.messages, list(prompt.tools))
    assert "convert_currency" in with_tools and "convert_currency" not in loaded.render_prompt(prompt.messages)
    predict_file(str(tuna["run"]), EXAMPLES / "tools_demo.json", tmp_path / "p.jsonl", GREEDY, max_samples=1)
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row["tools"] == list(prompt.tools)
    assert row["prediction"] == generate(loaded, [prompt.messages], GREEDY, tools=[list(prompt.tools)])[0]


# ------------------------------------------------------------------------------ the train summary line

def test_train_prints_the_token_weighted_mean_loss_not_the_last_step(tuna):
    """Equal-length examples (see ``tuna``): the token-weighted mean is the plain mean of the step losses."""
    losses = [row["loss"] for row in RunDir(tuna["run"]).read_metrics() if "loss" in row]
    assert len(losses) == 12 and abs(losses[-1] - sum(losses) / 12) > 1e-3
    assert f"train loss {sum(losses) / 12:.4f} (mean of the steps; last {losses[-1]:.4f})" in tuna["output"]


# ------------------------------------------------------------------------------ plots are optional

def test_loss_plot_is_skipped_with_a_notice_without_matplotlib(tmp_path, monkeypatch):
    from tunelab.compare import MethodResult, plot
    from tunelab.train.monitor import plot_metrics

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3)))
    assert plot_metrics(run) is None and run.loss_plot.stat().st_size > 0
    run.loss_plot.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is not installed
    notice = plot_metrics(run)
    assert notice and "loss.png skipped" in notice and "tunelab[plot]" in notice and not run.loss_plot.exists()
    compare_notice = plot([MethodResult("lora", eval_loss=1.0)], tmp_path / "compare.png")
    assert "compare.png skipped" in compare_notice and not (tmp_path / "compare.png").exists()


def test_core_dependencies_leave_out_plots_and_pandas():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "matplotlib" not in core and "pandas" not in core and "pyarrow" in core
    assert any(dep.startswith("matplotlib") for dep in project["optional-dependencies"]["plot"])
    assert "plot" in project["optional-dependencies"]["all"][0]


# ------------------------------------------------------------------------------ setup: which torch

def _fake_tools(folder: Path, gpu: bool) -> Path:
    """A PATH folder with a ``pip`` that records its arguments and an ``nvidia-smi`` that finds a GPU or not."""
    folder.mkdir()
    for name, body in (("pip", f'echo "$@" >> {folder}/pip.args\n'), ("nvidia-smi", f"exit {0 if gpu else 9}\n")):
        (folder / name).write_text("#!/bin/sh\n" + body)
        (folder / name).chmod(stat.S_IRWXU)
    return folder


def _install_torch(tools: Path, version: str, index: str) -> tuple[str, str]:
    env = dict(os.environ, PATH=f"{tools}:{Path(sys.executable).parent}:/usr/bin:/bin")
    done = subprocess.run(["bash", str(REPO / "scripts" / "install_torch.sh"), version, index], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    args = tools / "pip.args"
    return done.stdout, args.read_text() if args.exists() else ""


@pytest.fixture(scope="module")
def cpu_index(tmp_path_factory):
    """A reachable stand-in for PyTorch's CPU index."""
    root = tmp_path_factory.mktemp("index")
    (root / "torch").mkdir()
    server = HTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_setup_takes_the_cpu_index_without_a_gpu(tmp_path, cpu_index):
    said, pip = _install_torch(_fake_tools(tmp_path / "bin", gpu=False), "0.0.1", cpu_index)
    assert "no NVIDIA GPU: installing the CPU build of torch 0.0.1" in said
    assert pip.split() == ["install", "-q", "--disable-pip-version-check", "--index-url", cpu_index, "torch==0.0.1"]
    assert "setup: torch" in said and "CPU build" in said  # the report of what is installed (here: the venv's)


def test_setup_falls_back_to_the_configured_index_when_the_cpu_index_is_unreachable(tmp_path):
    with __import__("socket").socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"
    said, pip = _install_torch(_fake_tools(tmp_path / "bin", gpu=False), "0.0.1", unreachable)
    assert "does not answer" in said
    assert pip.split() == ["install", "-q", "--disable-pip-version-check", "torch==0.0.1"]


def test_setup_installs_the_cuda_build_with_a_gpu_and_nothing_when_present(tmp_path, cpu_index):
    said, pip = _install_torch(_fake_tools(tmp_path / "gpu", gpu=True), "0.0.1", cpu_index)
    assert "NVIDIA GPU found" in said and pip.split() == ["install", "-q", "--disable-pip-version-check",
                                                          "torch==0.0.1"]
    installed = torch.__version__.split("+")[0]
    said, pip = _install_torch(_fake_tools(tmp_path / "again", gpu=False), installed, cpu_index)
    assert "already installed" in said and pip == ""


def test_identity_choice_set_is_balanced_and_held_out():
    """examples/data/mc_identity.csv, the README's evidence about the choice task on SmolLM2."""
    from tunelab.evaluate.choice_data import load_choice_data

    questions = load_choice_data(str(EXAMPLES / "mc_identity.csv")).scored["identity"]
    assert len(questions) == 20 and sorted(q.answer for q in questions) == sorted("ABCD" * 5)
    trained = {row["instruction"].lower() for name in ("identity.json", "identity_eval.json")
               for row in json.loads((EXAMPLES / name).read_text())}
    assert not trained & {q.question.lower() for q in questions}
