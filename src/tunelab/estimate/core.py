"""Predict a run's peak memory from its config: resolve the target, read the data, build
the meta skeleton, evaluate the formula (see :mod:`tunelab.estimate.formula`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ModelConfig, RunConfig
from tunelab.data.pipeline import DataBundle
from tunelab.errors import ConfigError
from tunelab.estimate.baseline import framework_bytes
from tunelab.estimate.formula import (Breakdown, Calibration, Precision, Settings, Target, default_calibration,
                                      peak_breakdown)
from tunelab.estimate.skeleton import ModelFacts, model_facts
from tunelab.estimate.workload import Workload, load_workload, plan
from tunelab.methods.base import get_method
from tunelab.models.loader import load_tokenizer, model_directory, training_dtype
from tunelab.memory import proc_kib_field_bytes
from tunelab.train.runtime import packing_enabled, resolve_precision, trains_on_compact_heap

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+(?:\.\d+)?)\s*(gb|gib|g)?)?$", re.IGNORECASE)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    """A prediction with everything needed to explain it (and to re-evaluate it cheaply)."""

    config: RunConfig
    target: Target
    facts: ModelFacts
    workload: Workload
    precision: Precision
    framework: int
    calibration: Calibration = Calibration()
    notes: list[str] = field(default_factory=list)
    weight_file_bytes: int = 0  # checkpoint files converted while the model loads (CPU load peak)

    def evaluate(self, calibration: Calibration) -> Breakdown:
        """The peak breakdown under ``calibration`` (no data or model work: formula only)."""
        cfg = self.config
        run = Settings(precision=self.precision, target=self.target, optimizer=cfg.train.optimizer,
                       checkpointing=cfg.train.gradient_checkpointing, chunk=cfg.train.loss_chunk_size,
                       grad_accum=cfg.train.grad_accum, framework=self.framework, calibration=calibration,
                       reference_copy=cfg.stage in ("dpo", "kto") and cfg.method.type in ("full", "freeze"),
                       weight_file_bytes=self.weight_file_bytes)
        return peak_breakdown(self.facts, self.workload, run)

    @property
    def breakdown(self) -> Breakdown:
        return self.evaluate(self.calibration)

    @property
    def peak_bytes(self) -> int:
        return self.breakdown.total

    def to_dict(self) -> dict[str, Any]:
        result = self.breakdown
        batch, facts, work = result.batch, self.facts, self.workload
        capacity = self.target.capacity_bytes
        return {
            "predicted_peak_bytes": result.total,
            "breakdown": dict(result.terms),
            "phase": result.phase,
            "device": self.target.device,
            "capacity_bytes": capacity,
            "fits": None if capacity is None else result.total <= capacity,
            "num_gpus": self.target.num_gpus,
            "zero_stage": self.target.zero_stage,
            "model": {"total_params": facts.total_params, "trainable_params": facts.trainable_params,
                      "weights_by_kind": dict(facts.weight_bytes), "layers": facts.layers,
                      "layers_on_gradient_path": facts.layers - facts.first_grad_layer,
                      "hidden": facts.hidden, "intermediate": facts.intermediate, "vocab": facts.vocab},
            "precision": {"activation_bytes": self.precision.activation,
                          "residual_bytes": self.precision.residual,
                          "autocast_weight_copies": self.precision.autocast_copies},
            "peak_batch": {"rows": batch.rows, "width": batch.width, "tokens": batch.tokens,
                           "supervised": batch.supervised, "sequences": batch.sequences, "packed": work.packed},
            "data": {"examples": work.examples, "mean_length": round(work.mean_length, 1), "steps": work.steps,
                     "micro_batches": len(work.batches),
                     "mean_batch_tokens": round(sum(b.tokens for b in work.batches) / max(len(work.batches), 1), 1)},
            "notes": list(self.notes),
        }


def parse_target(device: str | None, num_gpus: int = 1, zero_stage: int = 0) -> Target:
    """``cpu``, ``cuda`` or ``cuda:80GB`` (+ GPU count and ZeRO stage) -> :class:`Target`."""
    text = (device or ("cuda" if torch.cuda.is_available() else "cpu")).strip()
    match = _DEVICE.match(text)
    if match is None:
        raise ConfigError(f"--device '{text}' is not understood. Use cpu, cuda, or cuda:<memory>GB such as "
                          "cuda:80GB (the memory of one GPU).")
    kind, size = match.group(1).lower(), match.group(2)
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3.")
    if num_gpus < 1:
        raise ConfigError(f"--gpus {num_gpus}: the number of GPUs must be at least 1.")
    if kind == "cpu" and (num_gpus > 1 or zero_stage):
        raise ConfigError("--gpus and --zero describe multi-GPU training; use them with --device cuda[:<memory>GB].")
    if kind == "cpu":
        capacity = proc_kib_field_bytes("/proc/meminfo", "MemTotal")
    elif size is not None:
        capacity = int(float(size) * 2**30)
    else:
        capacity = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    return Target(kind, capacity, num_gpus, zero_stage)


def weight_dtype(cfg: RunConfig, target: Target) -> torch.dtype:
    """The dtype the trainer gives the float weights on ``target`` (``loader.training_dtype``)."""
    return training_dtype(cfg.model.dtype, mixed_precision(cfg, target), get_method(cfg.method).trains_base_weights)


def mixed_precision(cfg: RunConfig, target: Target) -> str:
    """accelerate's mixed precision for the run: 'bf16', 'fp16' or 'no' (CPU: as on this machine)."""
    if target.device == "cpu":
        return resolve_precision(cfg.train.precision)
    return {"auto": "bf16", "fp32": "no"}.get(cfg.train.precision, cfg.train.precision)


def precision_of(cfg: RunConfig, target: Target, quantized: bool) -> Precision:
    """Byte sizes of activations and the residual stream, and whether autocast copies weights."""
    dtype = weight_dtype(cfg, target)
    weights = _DTYPE_BYTES[str(dtype).replace("torch.", "")]
    # QLoRA's preparation upcasts fp16 float parts to fp32 and keeps bf16 ones (methods.lora)
    residual = 4 if quantized and dtype == torch.float16 else weights
    mixed = mixed_precision(cfg, target)
    activation = 2 if mixed in ("bf16", "fp16") else residual
    return Precision(activation=activation, residual=residual,
                     autocast_copies=activation == 2 and weights == 4 and not quantized)


def _check_stage(cfg: RunConfig) -> list[str]:
    if cfg.stage == "ppo":
        raise ConfigError("tunelab estimate covers the batch stages (pt, sft, rm, dpo, kto); PPO's rollouts, reward "
                          "and value models are not modelled. Estimate the policy's sft run instead.")
    if cfg.stage in ("rm", "dpo", "kto"):
        return [f"stage {cfg.stage}: chosen and rejected sequences are counted as one micro-batch; the reference "
                "model's forward pass runs without gradients and is not counted."]
    return []


def estimate(cfg: RunConfig, target: Target, *, framework: int | None = None,
             calibration: Calibration | None = None, data: DataBundle | None = None) -> MemoryEstimate:
    """Predict the peak memory of training ``cfg`` on ``target``.

    ``framework`` overrides the measured CPU framework baseline (tests pass 0 to skip the
    measurement subprocess); ``calibration``, the fitted constants (by default those of the
    run's C heap, :func:`~tunelab.train.runtime.trains_on_compact_heap`); ``data``, the
    tokenized data of ``cfg`` when the caller has it (the memory budget re-plans it for every
    micro-batch split it tries).
    """
    notes = _check_stage(cfg)
    compact = trains_on_compact_heap(cfg, target.device)
    if compact:
        notes.append("compact C heap (train.compact_heap): glibc's leftovers are counted as measured on "
                     "compact-heap runs.")
    if calibration is None:
        calibration = default_calibration(compact)
    tokenizer = load_tokenizer(cfg.model)
    method = get_method(cfg.method)
    packed = packing_enabled(cfg.data.packing, cfg.model.attn_implementation, method.supports_packing)
    workload = load_workload(cfg, tokenizer, packed) if data is None else plan(cfg, data, packed)
    quantized = cfg.model.quantization != "none" or cfg.method.type == "qlora"
    dtype = weight_dtype(cfg, target)
    facts = model_facts(cfg, tokenizer, dtype, workload.steps)
    if facts.method_note:
        notes.append(facts.method_note)
    precision = precision_of(cfg, target, quantized)
    if framework is None:
        framework = framework_bytes() if target.device == "cpu" else 0
    if cfg.train.optimizer.startswith("paged"):
        notes.append("paged optimizer states are counted on the device; under memory pressure they move to host "
                     "memory instead of failing.")
    if target.device == "cuda":
        notes.append("CUDA: predicted torch.cuda.max_memory_allocated; the CUDA context (~0.5 GiB) comes on top.")
    converted = converted_file_bytes(cfg.model, dtype, quantized)
    return MemoryEstimate(cfg, target, facts, workload, precision, framework, calibration, notes, converted)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def converted_file_bytes(model: ModelConfig, dtype: torch.dtype, quantized: bool) -> int:
    """Bytes of checkpoint files the loader converts (to another dtype, or quantizes).

    The files are memory-mapped, so during a conversion they are resident next to the
    converted weights. Loaded in their own dtype, the weights are the files' data: one copy
    (measured: an fp32 freeze run from fp32 files peaks below framework + weights + files).
    ``.bin`` files cannot be inspected without loading them and count as converted.
    """
    from safetensors import safe_open

    directory = Path(model_directory(model))
    files = list(directory.glob("*.safetensors"))
    if not files:
        return sum(f.stat().st_size for f in directory.glob("*.bin"))
    stored: set[torch.dtype] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            stored |= {_SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(), dtype) for key in handle.keys()}
    if stored == {dtype} and not quantized:
        return 0
    return sum(f.stat().st_size for f in files)
