"""The package's shape: every module imports on its own, no import cycles, imports only point down.

The layers are those of docs/DESIGN.md. The graph is read from the source (every
``import``, including those inside functions; not those under ``if TYPE_CHECKING:``, which
never run), so a lazy import that points upward is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab

PACKAGE_ROOT = Path(tunelab.__file__).parent

#: Layer of each module, by longest matching prefix; an import may only point to the same or a lower layer.
LAYERS: dict[str, int] = {
    "tunelab.errors": 0, "tunelab.io": 0, "tunelab.memory": 0, "tunelab.heap": 0, "tunelab.progress": 0,
    "tunelab.config": 1, "tunelab.generation_options": 1, "tunelab.method_defaults": 1,
    "tunelab.runs": 2, "tunelab.trackers": 2,
    "tunelab.data": 3,
    "tunelab.models": 4, "tunelab.virtual_tokens": 4,
    "tunelab.methods": 5,
    "tunelab.testing": 5,
    "tunelab.inference": 6,
    # train/: the parts steps use, the lifecycle, the trainers (any other train module), the stage declarations
    **{f"tunelab.train.{name}": 7 for name in ("losses", "rl_math", "optim", "runtime", "checkpoint", "reference",
                                               "rewards", "rollout", "objectives", "batches", "monitor",
                                               "stream_batches", "distributed", "compile", "launch")},
    "tunelab.train.lifecycle": 8,
    "tunelab.train": 9,
    "tunelab.train.stages": 10,
    "tunelab.predict": 11, "tunelab.evaluate": 11, "tunelab.export": 11, "tunelab.serve": 11,
    "tunelab.estimate": 11, "tunelab.compare": 11, "tunelab.score": 11, "tunelab.config_llamafactory": 11,
    "tunelab.data_commands": 11, "tunelab.chat_repl": 11,
    "tunelab.webui": 12, "tunelab.cli": 12,  # the user surfaces (the web UI reuses the CLI's option parsing)
    "tunelab": 13,
}
#: The stage registry file itself: stage names only, read by config.py (see DESIGN.md, Layers).
REGISTRY = "tunelab.train.stages"
#: The package itself holds only ``__version__``, which any layer may read.
LAYER_EXCEPTIONS = {REGISTRY: 0, "tunelab": 0}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def layer(module: str) -> int:
    if module in LAYER_EXCEPTIONS:
        return LAYER_EXCEPTIONS[module]
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_every_module_has_a_layer():
    """A new top-level module must be placed in LAYERS (and in docs/DESIGN.md's picture)."""
    unplaced = [m for m in MODULES if m != "tunelab" and m.count(".") == 1 and m not in LAYERS]
    assert unplaced == []


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(module: str) -> set[str]:
    """The tunelab modules ``module`` imports when it runs (``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    targets: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative import
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {t for t in targets if t in MODULES and t != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_imports_only_point_down():
    upward = [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
              for module, targets in sorted(GRAPH.items()) for target in sorted(targets)
              if layer(target) > layer(module)]
    assert upward == []


def test_the_registry_file_imports_nothing_but_errors():
    assert GRAPH[REGISTRY] <= {"tunelab.errors"}


def test_the_graph_sees_lazy_imports_and_skips_type_only_ones():
    assert "tunelab.train.stages" in GRAPH["tunelab.train"]  # imported inside run_stage
    assert "tunelab.train.lifecycle" not in GRAPH["tunelab.train.stages.base"]  # under TYPE_CHECKING only


#: Imported once in the parent so each child only pays for tunelab's own modules.
_PRELOAD = ("torch", "transformers", "peft", "accelerate", "safetensors", "pydantic", "yaml", "tqdm", "pyarrow",
            "fastapi", "gradio")
_CHILD = """
import importlib, os, sys
for name in {preload!r}:
    try:
        importlib.import_module(name)
    except ImportError:  # an optional extra that is not installed: the modules needing it report it
        pass
failed = []
for module in {modules!r}:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException as err:
            sys.stderr.write(f"{{module}}: {{type(err).__name__}}: {{err}}\\n")
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        failed.append(module)
print("FAILED", failed)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter state (a fork of one that has loaded no tunelab module)."""
    code = _CHILD.format(preload=_PRELOAD, modules=sorted(MODULES))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "FAILED []", done.stderr[-3000:]
