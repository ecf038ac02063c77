"""``tunelab compare``: run several methods on one job and tabulate what each costs and gains.

Every method trains on the same data, steps and seed, each in its own subprocess so that
peak memory is measured per method and one method's crash cannot take the others down.
Before training, each run evaluates its base model with the method switched off
(``train.eval_base``), so the table shows whether fine-tuning helped on the eval split.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.config import load_config, save_config
from tunelab.errors import ConfigError
from tunelab.io import atomic_open, write_json, write_text
from tunelab.train.monitor import NO_MATPLOTLIB, pyplot


@dataclass
class MethodResult:
    method: str
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_percent: float | None = None
    peak_memory_bytes: int | None = None
    tokens_per_s: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    mergeable: bool | None = None
    wall_s: float | None = None
    error: str | None = None


def _split_method_overrides(items: list[str], methods: list[str], known: set[str]) -> dict[str, list[str]]:
    """``prefix:train.lr=1e-2`` -> {"prefix": ["train.lr=1e-2"]}.

    Settings for known methods that are not being run are ignored, so one script can
    hold every method's settings and run any subset.
    """
    per_method: dict[str, list[str]] = {m: [] for m in methods}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or method not in known:
            raise ConfigError(f"--set '{item}': write METHOD:key=value with METHOD a method type "
                              f"({', '.join(sorted(known))}).")
        if method in per_method:
            per_method[method].append(override)
    return per_method


def _worker(config_path: str, result_path: str) -> None:
    """Child process: train one method and write its numbers as JSON."""
    from tunelab.errors import TunelabError
    from tunelab.methods.base import get_method
    from tunelab.train import run_stage

    cfg = load_config(config_path)
    result = MethodResult(method=cfg.method.type)
    try:
        result.mergeable = get_method(cfg.method).mergeable
        run = run_stage(cfg, overwrite=True, discard=True, progress=False)
        result.trainable_params, result.total_params = run.trainable_params, run.total_params
        result.trainable_percent = 100.0 * run.trainable_params / max(run.total_params, 1)
        result.peak_memory_bytes, result.tokens_per_s = run.peak_memory_bytes, run.tokens_per_s
        result.train_loss, result.eval_loss, result.wall_s = run.final_loss, run.eval_loss, run.wall_s
        result.base_eval_loss = run.last_metrics.get("base_eval_loss")
    except TunelabError as err:
        result.error = str(err)
    with atomic_open(result_path) as handle:
        json.dump(asdict(result), handle)


def _run_method(config_path: Path, result_path: Path, method: str) -> MethodResult:
    proc = subprocess.run([sys.executable, "-m", "tunelab.compare", str(config_path), str(result_path)],
                          capture_output=True, text=True)
    if result_path.is_file():
        return MethodResult(**json.loads(result_path.read_text()))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return MethodResult(method=method, error=f"exit code {proc.returncode}: " + " | ".join(tail))


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{value:,}"
    if kind == "pct":
        return f"{value:.3f}%"
    if kind == "gib":
        return f"{value / 2**30:.2f} GiB"
    if kind == "bool":
        return "yes" if value else "no"
    return f"{value:.1f}" if kind == "rate" or kind == "s" else f"{value:.4f}"


COLUMNS = [("method", "method", "str"), ("trainable params", "trainable_params", "int"),
           ("trainable", "trainable_percent", "pct"), ("peak memory", "peak_memory_bytes", "gib"),
           ("tokens/s", "tokens_per_s", "rate"), ("train loss", "train_loss", "loss"),
           ("eval loss", "eval_loss", "loss"), ("base eval loss", "base_eval_loss", "loss"),
           ("mergeable", "mergeable", "bool"), ("wall s", "wall_s", "s")]


def markdown_table(results: list[MethodResult]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " | error |",
             "|" + "---|" * (len(COLUMNS) + 1)]
    for r in results:
        cells = [r.method if kind == "str" else _fmt(getattr(r, key), kind) for _, key, kind in COLUMNS]
        error = (r.error or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append("| " + " | ".join(cells) + f" | {error} |")
    return "\n".join(lines) + "\n"


def plot(results: list[MethodResult], target: Path) -> str | None:
    """Draw the comparison into ``target``; a one-line notice when matplotlib (optional) is missing."""
    ok = [r for r in results if r.error is None]
    if not ok:
        return None
    plt = pyplot()
    if plt is None:
        return f"note: {target.name} skipped: {NO_MATPLOTLIB}"
    names = [r.method for r in ok]
    panels = [("eval loss (line: base)", [r.eval_loss or 0 for r in ok]),
              ("trainable params (%)", [r.trainable_percent or 0 for r in ok]),
              ("peak memory (GiB)", [(r.peak_memory_bytes or 0) / 2**30 for r in ok]),
              ("tokens/s", [r.tokens_per_s or 0 for r in ok])]
    fig, axes = plt.subplots(1, 4, figsize=(4 * 4, 3.6))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
    base = next((r.base_eval_loss for r in ok if r.base_eval_loss is not None), None)
    if base is not None:
        axes[0].axhline(base, color="#c44e52", linestyle="--")
    axes[1].set_yscale("log")
    fig.tight_layout()
    with atomic_open(target, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return None


def compare(config: str | Path, overrides: list[str], methods: list[str], out_dir: str | Path,
            method_overrides: list[str] | None = None, echo=print) -> list[MethodResult]:
    """Train each method on the same job; write compare.json, compare.md and compare.png."""
    from tunelab.methods.base import METHODS

    import tunelab.methods  # noqa: F401  (registers methods)

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods names unknown method(s) {unknown}; known: {', '.join(sorted(METHODS))}.")
    per_method = _split_method_overrides(method_overrides or [], methods, set(METHODS))
    # the job's own checks; as the first method, so method keys meant for others are dropped, not errors
    probe = load_config(config, [*overrides, *(f"method.type={m}" for m in methods[:1])])
    if not probe.data.eval and not probe.data.eval_split:
        raise ConfigError("compare needs an eval set to tell methods apart: set data.eval or data.eval_split.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in methods:
            cfg = load_config(config, [*overrides, f"method.type={method}", f"output_dir={out / method}",
                                       "train.eval_base=true", *per_method[method]])
            cfg_path = Path(scratch) / f"{method}.yaml"
            save_config(cfg, cfg_path)
            echo(f"[compare] training {method} ...")
            result = _run_method(cfg_path, Path(scratch) / f"{method}.json", method)
            echo(f"[compare] {method}: " + (f"eval loss {result.eval_loss:.4f}" if result.error is None
                                            and result.eval_loss is not None else f"error: {result.error}"))
            results.append(result)
            write_json(out / "compare.json", [asdict(r) for r in results])
    write_text(out / "compare.md", markdown_table(results))
    skipped = plot(results, out / "compare.png")
    if skipped:
        echo(skipped)
    return results


if __name__ == "__main__":  # the per-method child process
    _worker(sys.argv[1], sys.argv[2])
