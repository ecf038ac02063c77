"""``tunelab estimate``: predicted peak memory of a run, term by term, optionally verified.

The formula and its calibration are documented in :mod:`tunelab.estimate.formula`; the
model skeleton (meta device, method applied) in :mod:`tunelab.estimate.skeleton`; the
micro-batches from the real data in :mod:`tunelab.estimate.workload`; the measurement
run in :mod:`tunelab.estimate.measure`.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from tunelab.config import load_config
from tunelab.estimate.core import MemoryEstimate, estimate, parse_target
from tunelab.estimate.formula import Calibration
from tunelab.estimate.measure import MEASURE_STEPS, Measurement, measure_run, steps_override

__all__ = ["Calibration", "MemoryEstimate", "error_pct", "estimate", "estimate_main", "parse_target", "verify"]

#: Display order and labels of the breakdown terms.
_LABELS = {
    "framework": "framework (Python, torch, transformers)",
    "dataset": "tokenized dataset",
    "weights": "weights",
    "weight_files": "checkpoint files being loaded",
    "gathered_layers": "gathered layers (ZeRO-3)",
    "reference_model": "reference model (frozen copy)",
    "autocast_copies": "16-bit weight copies (autocast)",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "optimizer_temporaries": "optimizer step temporaries",
    "activations": "activations",
    "logits": "logits + loss (chunked)",
    "backward": "backward transient",
    "kernel_cache": "oneDNN kernel cache (bf16 shapes)",
    "allocator": "allocator slack (glibc heap)",
    "weight_reorders": "oneDNN reordered bf16 weights",
    "quantization_slack": "heap left by quantizing at load",
}


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def verify(config: str, overrides: list[str], target_device: str | None, num_gpus: int, zero_stage: int,
           steps: int = MEASURE_STEPS, framework: int | None = None) -> tuple[MemoryEstimate, Measurement]:
    """Estimate the ``steps``-step version of the run, then train it in a child process and measure it."""
    target = parse_target(target_device, num_gpus, zero_stage)
    short = load_config(config, [*overrides, steps_override(steps)])
    predicted = estimate(short, target, framework=framework)
    return predicted, measure_run(config, overrides, steps, target.device)


def error_pct(predicted: int, measured: int) -> float:
    """Signed error of the prediction relative to the measurement, in percent."""
    return 100.0 * (predicted - measured) / max(measured, 1)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report of :func:`estimate_main`."""
    lines = [f"predicted peak memory: {gib(result['predicted_peak_bytes'])} on {result['device']}"
             f" (phase: {result['phase']})"]
    width = max(len(label) for label in _LABELS.values())
    for key, value in result["breakdown"].items():
        if value:
            lines.append(f"  {_LABELS.get(key, key):<{width}}  {gib(value):>11}")
    model, batch, data = result["model"], result["peak_batch"], result["data"]
    lines.append(f"model: {model['total_params']:,} parameters, {model['trainable_params']:,} trainable; "
                 f"{model['layers_on_gradient_path']} of {model['layers']} layers on the gradient path")
    lines.append(f"largest micro-batch: {batch['rows']} x {batch['width']} ({batch['tokens']} tokens, "
                 f"{batch['supervised']} supervised, {'packed' if batch['packed'] else 'padded'}); "
                 f"{data['examples']} examples, mean {data['mean_length']} tokens, {data['steps']} steps")
    if result["capacity_bytes"]:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {gib(result['capacity_bytes'])}"
                     + (f" per GPU ({result['num_gpus']} GPUs, ZeRO-{result['zero_stage']})"
                        if result["num_gpus"] > 1 else ""))
    if "measured_peak_bytes" in result:
        m = result["measure"]
        lines.append(f"measured ({m['steps']} steps, {m['wall_s']:.0f}s): {gib(result['measured_peak_bytes'])} vs "
                     f"predicted {gib(m['predicted_peak_bytes'])} for those steps: error {m['error_pct']:+.1f}%")
    lines.extend(f"note: {note}" for note in result["notes"])
    return "\n".join(lines)


def estimate_main(config: str, overrides: list[str], device: str | None, num_gpus: int, zero_stage: int,
                  measure: bool, as_json: bool, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``tunelab estimate``: print the breakdown table (or JSON) and return the result dict."""
    cfg = load_config(config, overrides)
    if cfg.train.distributed == "fsdp" and num_gpus > 1:  # FSDP2 shards weights, gradients and optimizer
        zero_stage = max(zero_stage, 3)                     # state per rank as ZeRO-3 does
    result = estimate(cfg, parse_target(device, num_gpus, zero_stage)).to_dict()
    if measure:
        predicted, measured = verify(config, overrides, device, num_gpus, zero_stage)
        result["measured_peak_bytes"] = measured.peak_bytes
        result["measure"] = {"steps": measured.steps, "wall_s": round(measured.wall_s, 1),
                             "predicted_peak_bytes": predicted.peak_bytes,
                             "predicted_breakdown": dict(predicted.breakdown.terms),
                             "error_pct": round(error_pct(predicted.peak_bytes, measured.peak_bytes), 2),
                             "tokens_per_s": measured.tokens_per_s, "final_loss": measured.final_loss}
    echo(json.dumps(result, indent=2) if as_json else format_table(result))
    return result
