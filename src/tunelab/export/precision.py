"""Which float type an export is written in: the user's ``--dtype``, else the base model's own.

Why the base's own by default: a bf16 model fine-tuned and exported in fp32 doubles its size
(538 MB instead of 269 MB for SmolLM2-135M) without gaining anything, since the base weights
never had more precision than bf16. The base's dtype is read from what is stored, not from
what its config claims: the safetensors headers of a Hugging Face directory (its
``config.json`` when it has none), or the tensor types of a GGUF file.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import ModelConfig
from tunelab.models.loader import resolve_source

#: ``--dtype`` names -> torch dtypes.
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {dtype: name for name, dtype in EXPORT_DTYPES.items()}
#: How safetensors headers and config.json spell the float types.
_STORED = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class DtypeChoice:
    """The export dtype and why it was chosen (printed, so the user knows what they got)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return _NAMES[self.dtype]


def export_dtype(requested: str | None, base: ModelConfig) -> DtypeChoice:
    """``requested`` (bf16, fp16, fp32) if given, else the dtype the base model is stored in."""
    if requested is not None:
        return DtypeChoice(EXPORT_DTYPES[requested], "as asked with --dtype")
    source = resolve_source(base.name_or_path, base.gguf_file, base.revision)
    if source.gguf_file is not None:
        return _gguf_dtype(source.directory / source.gguf_file)
    return _directory_dtype(source.directory)


def _directory_dtype(directory: Path) -> DtypeChoice:
    """The float type holding most of the bytes of a HF directory's safetensors files."""
    from safetensors import safe_open

    stored: Counter[str] = Counter()
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                part = handle.get_slice(key)
                if part.get_dtype() in _STORED:
                    stored[_STORED[part.get_dtype()]] += math.prod(part.get_shape())
    if stored:
        name = stored.most_common(1)[0][0]
        return DtypeChoice(EXPORT_DTYPES[name], f"the base's own: its weights are stored in {name}")
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    declared = config.get("dtype") or config.get("torch_dtype")
    if declared in _STORED:
        name = _STORED[declared]
        return DtypeChoice(EXPORT_DTYPES[name], f"the base's own: its config.json declares {declared}")
    return DtypeChoice(torch.float32, "the base states no dtype, so fp32 loses nothing; pass --dtype bf16 to halve it")


def _gguf_dtype(file: Path) -> DtypeChoice:
    """A GGUF base: its float type if its weights are floats; fp16 if they are quantized.

    Quantized GGML blocks store their scales (and minimums) in fp16, so fp16 keeps the
    dequantized weights with less rounding than bf16 (11 significant bits against 8).
    """
    from gguf import GGMLQuantizationType, GGUFReader

    floats = {GGMLQuantizationType.F32: "fp32", GGMLQuantizationType.F16: "fp16", GGMLQuantizationType.BF16: "bf16"}
    stored: Counter[GGMLQuantizationType] = Counter()
    for tensor in GGUFReader(str(file)).tensors:
        stored[tensor.tensor_type] += int(tensor.n_elements)
    kind = stored.most_common(1)[0][0]
    if kind in floats:
        return DtypeChoice(EXPORT_DTYPES[floats[kind]], f"the base's own: its GGUF weights are {kind.name}")
    return DtypeChoice(torch.float16, f"the base is a {kind.name}-quantized GGUF file, whose blocks are scaled in "
                                      "fp16; pass --dtype bf16 or fp32 for another")

