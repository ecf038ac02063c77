"""The README's "Using it" commands run as written, in order, in a fresh copy (scripts/readme_check.py).

The run uses the script's fast mode (a tiny model on 16 examples; see its docstring), so
what is checked is that every command is accepted and does its job, not the numbers the
README quotes for SmolLM2 (those come from the scripts named beside them).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_check", REPO / "scripts" / "readme_check.py")
readme_check = sys.modules["readme_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(readme_check)

SAMPLE = """# title
## Using it

```bash
. .venv/bin/activate
tunelab train a.yaml --overwrite     # a comment
# a comment line
tunelab chat runs/a \\
  --prompt "Hi # not a comment"
```

```yaml
model: {name_or_path: x}
```

### A subsection

```bash
tunelab webui                        # a server: only when marked
```

## Elsewhere

```bash
pip install something                # not checked
```

<!-- readme-check -->
```bash
tunelab config-keys
```
"""


def test_checked_blocks_are_the_using_it_section_and_marked_ones():
    blocks = readme_check.readme_blocks(SAMPLE)
    assert [readme_check.commands(block) for block in blocks] == [
        [". .venv/bin/activate", "tunelab train a.yaml --overwrite     # a comment",
         'tunelab chat runs/a --prompt "Hi # not a comment"'],
        ["tunelab config-keys"]]
    assert readme_check.tunelab_command('tunelab chat runs/a --prompt "Hi # x"  # comment') == [
        "tunelab", "chat", "runs/a", "--prompt", "Hi # x"]


def test_the_readme_has_a_checked_block():
    commands = [c for block in readme_check.readme_blocks((REPO / "README.md").read_text()) for c in
                readme_check.commands(block)]
    words = [readme_check.tunelab_command(c)[1:2] for c in commands]
    assert commands[0] == ". .venv/bin/activate"
    for command in ("train", "chat", "predict", "export", "eval", "serve"):
        assert [command] in words, command


def _editable_source() -> str:
    return subprocess.run([sys.executable, "-c", "import tunelab; print(tunelab.__file__)"], capture_output=True,
                          text=True, check=True, cwd="/").stdout.strip()


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    before = _editable_source()
    results = readme_check.check_readme(tmp_path_factory.mktemp("readme") / "copy", echo=lambda line: None)
    assert _editable_source() == before, "the check must not reinstall tunelab from its copy"
    return results


def _outputs(ran, start: str) -> list[str]:
    """The outputs of the commands that begin with ``start``, in order."""
    return [r.output for r in ran if r.command.startswith(start)]


def test_every_readme_command_runs_in_order(ran):
    failed = [f"{r.ran}\n{r.output[-3000:]}" for r in ran if not r.ok]
    assert not failed, failed[0]
    checked = [c for block in readme_check.readme_blocks((REPO / "README.md").read_text())
               for c in readme_check.commands(block)]
    assert [r.command for r in ran] == [c for c in checked if not c.startswith(readme_check.SETUP_PREFIXES)]


def test_readme_commands_do_what_their_comments_say(ran):
    first, other, resumed = _outputs(ran, "tunelab train")
    assert "done: 8 steps" in first and "done: 8 steps" in other  # 16 examples, batch 8, 4 epochs
    assert "train.epochs: 4.0 -> 5.0" in resumed and "done: 10 steps" in resumed  # on from step 8, one more epoch
    assert _outputs(ran, "tunelab --version")[0].startswith("tunelab ")
    session = next(r.output for r in ran if r.command.split("#")[0].strip() == "tunelab chat runs/quickstart")
    assert "tunelab chat with runs/quickstart (lora on" in session and "Commands (tunelab handles them" in session
    assert "(new conversation)" in session
    table = _outputs(ran, "tunelab eval")[0]
    assert "base" in table and "tuned" in table and "delta" in table
    assert "chat completion:" in _outputs(ran, "tunelab serve")[0]
