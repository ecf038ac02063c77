"""Run the README's command blocks in order, in a fresh copy of the repository; fail if one fails.

So the README cannot drift from the code: ``tests/test_readme_commands.py`` runs this on
every test run. Which blocks: the ```bash blocks of the "## Using it" section itself (not
of its subsections), and any block right after a ``<!-- readme-check -->`` line. Each line of a block is one command
(``#`` starts a comment); lines that set up the shell (``. .venv/bin/activate``, ``export``,
``cd``) carry over to the commands after them, as they would in a terminal.

The copy holds the working tree as ``git`` sees it (tracked and new, not ignored files)
and a ``.venv`` of its own that imports the copy's ``src/`` first and the running
environment's packages after it, but installs into itself: a README line such as
``pip install -e .`` must never repoint the developer's (or CI's) environment at the copy.
Commands run as written, with ``HF_HUB_OFFLINE=1``, except for these substitutions, each
printed when it applies:

- fast (the default): ``examples/quickstart.yaml`` in the copy trains a tiny random model
  (2 layers, hidden size 64, written by ``tunelab.testing.tiny``) instead of the embedded
  SmolLM2, on the first 16 examples of each dataset (``data.max_samples: 16``: 2 steps an
  epoch instead of 12), with a checkpoint every 2 steps (``train.save_every: 2``, so
  ``--resume`` has one to continue from), so the block runs in a few minutes on 2 CPU
  cores. The commands and every other setting are the README's. ``--full`` changes
  nothing (the real model; about 20 minutes on 2 quiet cores: seven trainings).
- ``serve`` runs until stopped: it is started in the background, must answer
  ``/v1/models`` and one chat completion, and is then stopped; its ``--port`` becomes a free
  one (a fixed port may be taken on a shared machine).
- An interactive ``chat`` (no ``--prompt``) reads a scripted session from stdin:
  ``/help``, a question, ``/reset``, ``/exit``.

Usage: python scripts/readme_check.py [--full] [--keep DIR] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-check -->"
SECTION = "## Using it"
#: Lines that change the shell the next commands run in (carried over to each of them).
SETUP_PREFIXES = (". ", "source ", "export ", "cd ")
CHAT_SESSION = "/help\nWho are you?\n/reset\n/exit\n"
SERVE_READY_S = 300
#: Fast mode's job: 16 examples (2 steps an epoch at the quickstart's batch of 8), a checkpoint every 2 steps.
FAST_SAMPLES, FAST_SAVE_EVERY = 16, 2


@dataclass
class Result:
    command: str  # as the README writes it
    ran: str  # after the substitutions
    returncode: int
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def readme_blocks(text: str) -> list[list[str]]:
    """The checked blocks' lines, in README order: the "Using it" section's own bash blocks and marked ones."""
    blocks, section, marked = [], "", False
    lines = iter(text.splitlines())
    for line in lines:
        if re.match(r"#{1,6} ", line):
            section = line.strip()
        if line.strip() == MARKER:
            marked = True
            continue
        if line.strip().startswith("```"):
            body = []
            for inner in lines:
                if inner.strip().startswith("```"):
                    break
                body.append(inner)
            if line.strip() in ("```bash", "```sh") and (marked or section == SECTION):
                blocks.append(body)
        if line.strip():
            marked = False
    return blocks


def commands(block: list[str]) -> list[str]:
    """Each command of a block, comments included (bash reads them); a trailing ``\\`` joins the next line."""
    joined, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.strip()[:-1].strip() + " "
            continue
        text, pending = pending + line.strip(), ""
        if text and not text.startswith("#"):
            joined.append(text)
    return joined


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tunelab_command(command: str) -> list[str]:
    """The words of a ``tunelab ...`` command (``[]`` for anything else)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return []
    return words if words and words[0] == "tunelab" else []


def prepare_copy(root: Path, fast: bool) -> list[str]:
    """Lay out the working tree in ``root``; returns the substitutions made (for the log)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    make_environment(root)
    if not fast:
        return []
    import yaml

    from tunelab.testing.tiny import save_tiny_model_dir

    model_dir = save_tiny_model_dir(root / "tiny-model")
    quickstart = root / "examples" / "quickstart.yaml"
    config = yaml.safe_load(quickstart.read_text())
    config["model"]["name_or_path"] = str(model_dir)
    config["data"]["max_samples"] = FAST_SAMPLES
    config["train"]["save_every"] = FAST_SAVE_EVERY
    quickstart.write_text(yaml.safe_dump(config, sort_keys=False))
    return [f"examples/quickstart.yaml: model.name_or_path {model_dir} (a tiny random model), data.max_samples "
            f"{FAST_SAMPLES}, train.save_every {FAST_SAVE_EVERY}; --full keeps the README's settings"]


def make_environment(root: Path) -> None:
    """``root/.venv``: sees ``root/src`` and then this interpreter's packages; pip installs into it alone."""
    env = root / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site_packages = next((env / "lib").glob("python*/site-packages"))
    shared = sysconfig.get_paths()["purelib"]
    # A .pth line is a path, or code when it starts with "import": addsitedir also reads the shared
    # environment's own .pth files (editable installs), which a plain path line would not.
    (site_packages / "readme_check.pth").write_text(f"{root / 'src'}\nimport site; site.addsitedir({shared!r})\n")
    for name, body in (("tunelab", "from tunelab.cli import main\nsys.exit(main())"),
                       ("pip", "from pip._internal.cli.main import main\nsys.exit(main())")):
        script = env / "bin" / name
        script.write_text(f"#!{env / 'bin' / 'python'}\nimport sys\n{body}\n")
        script.chmod(0o755)


def _environment() -> dict[str, str]:
    """This process's environment without its virtualenv (the copy's own is activated by the README)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep)
                                  if not Path(part).resolve().is_relative_to(Path(sys.prefix).resolve()))
    return env


def _shell(setup: list[str], command: str) -> list[str]:
    return ["bash", "-c", "set -euo pipefail\n" + "\n".join(setup + [command])]


def run_command(root: Path, setup: list[str], command: str, timeout: float) -> Result:
    """Run one README command in ``root`` (after the shell ``setup`` lines before it)."""
    words, ran, stdin = tunelab_command(command), command, None
    if words[1:2] == ["serve"]:
        return run_server(root, setup, command, timeout)
    if words[1:2] == ["chat"] and "--prompt" not in words:
        stdin = CHAT_SESSION
    started = time.perf_counter()
    try:
        proc = subprocess.run(_shell(setup, ran), cwd=root, env=_environment(), input=stdin, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        code, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as err:
        code, output = 124, f"{err.output or ''}\n(timed out after {timeout:.0f} s)"
    return Result(command, ran, code, time.perf_counter() - started, output)


def run_server(root: Path, setup: list[str], command: str, timeout: float) -> Result:
    """Start ``serve`` on a free port; it must answer /v1/models and one chat completion; then stop it."""
    port = free_port()
    ran = re.sub(r"--port[ =]\d+", f"--port {port}", command)
    if ran == command:
        ran = f"{command} --port {port}"
    started = time.perf_counter()
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(_shell(setup, f"exec {ran}"), cwd=root, env=_environment(), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base, problem = f"http://127.0.0.1:{port}/v1", None
    try:
        models = _wait_for_models(base, server, min(timeout, SERVE_READY_S))
        if models is None:
            problem = "the server did not answer /v1/models"
        else:
            body = json.dumps({"model": models[0], "max_tokens": 8,
                               "messages": [{"role": "user", "content": "Who are you?"}]}).encode()
            request = urllib.request.Request(f"{base}/chat/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as answer:
                reply = json.load(answer)["choices"][0]["message"]["content"]
            log.write(f"\n[readme_check] /v1/models: {models}; chat completion: {reply!r}\n")
    except OSError as err:
        problem = f"request failed: {err}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # SIGINT may be ignored: a background job inherits that
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    log.seek(0)
    output = log.read() + (f"\n[readme_check] {problem}\n" if problem else "")
    return Result(command, ran, 1 if problem else 0, time.perf_counter() - started, output)


def _wait_for_models(base: str, server: subprocess.Popen, timeout: float) -> list[str] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=5) as answer:
                return [model["id"] for model in json.load(answer)["data"]]
        except OSError:
            time.sleep(1)
    return None


def check_readme(root: Path, readme: Path = REPO / "README.md", fast: bool = True, timeout: float = 900,
                 echo=partial(print, flush=True)) -> list[Result]:
    """Copy the repository into ``root`` and run the README's checked commands there, in order."""
    blocks = readme_blocks(readme.read_text(encoding="utf-8"))
    if not blocks:
        raise SystemExit(f"{readme}: no ```bash block under '{SECTION}' and none after {MARKER}")
    for note in prepare_copy(root, fast):
        echo(f"[readme_check] substitution: {note}")
    results, setup = [], []
    for line in (command for block in blocks for command in commands(block)):
        if line.startswith(SETUP_PREFIXES):
            setup.append(line)
            continue
        result = run_command(root, setup, line, timeout)
        echo(f"[readme_check] {'ok  ' if result.ok else 'FAIL'} {result.seconds:6.1f}s  {result.ran}")
        results.append(result)
        if not result.ok:
            echo(result.output[-4000:])
            break
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="Keep the README's model (slow); default: tiny model.")
    parser.add_argument("--keep", type=Path, help="Run in this (new) directory and keep it, instead of a temp dir.")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True)
        results = check_readme(args.keep, args.readme, fast=not args.full)
    else:
        with tempfile.TemporaryDirectory(prefix="readme-check-") as scratch:
            results = check_readme(Path(scratch), args.readme, fast=not args.full)
    failed = [r for r in results if not r.ok]
    print(f"[readme_check] {len(results) - len(failed)} of {len(results)} commands ran"
          + (f"; failed: {failed[0].command}" if failed else f" in {sum(r.seconds for r in results):.0f} s"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
