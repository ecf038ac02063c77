"""``tunelab export``: which export the flags ask for, checked before anything is loaded.

Three outputs from one run directory: the merged model as a transformers directory
(safetensors, ``--dtype``), the merged model as one GGUF file for llama.cpp and Ollama
(``--format gguf``, ``--gguf-type``, ``--ollama``), or the adapter kept apart
(``--adapter-only``). Each returns the lines the command prints: what was written, in which
precision and why.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.export.adapter import export_adapter
from tunelab.export.gguf_file import GGUF_TYPES, write_gguf
from tunelab.export.gguf_vocab import gguf_vocab
from tunelab.export.merge import MergedRun, merge_run, require_run, save_merged
from tunelab.export.ollama import modelfile
from tunelab.export.precision import EXPORT_DTYPES, export_dtype
from tunelab.io import atomic_dir, write_text

FORMATS = ("safetensors", "gguf")
#: The GGUF type that keeps an export dtype as it is.
_GGUF_FOR_DTYPE = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}
MODELFILE = "Modelfile"
_QLORA_NOTE = ("note: this QLoRA run is merged into its dequantized 4-bit base: the export computes what the 4-bit "
               "model computed in training, not the original float base plus the adapter. For that, export with "
               "--adapter-only and load the adapter on the float base (README, Export, 'QLoRA runs').")


def export_main(run: str | Path, out: str | Path, fmt: str = "safetensors", dtype: str | None = None,
                gguf_type: str | None = None, adapter_only: bool = False, ollama: bool = False) -> list[str]:
    """Write the export the flags describe to ``out``; the lines to show the user."""
    _check_flags(fmt, dtype, gguf_type, adapter_only, ollama)
    require_run(run)
    if adapter_only:
        export_adapter(run, out)
        return [f"adapter written to {out} (a PEFT directory: PeftModel.from_pretrained(base, '{out}'))"]
    merged = merge_run(run)
    notes = [_QLORA_NOTE] if merged.from_4bit else []
    if fmt == "gguf":
        return _export_gguf(merged, Path(run), Path(out), dtype, gguf_type, ollama) + notes
    choice = export_dtype(dtype, merged.loaded.cfg.model)
    save_merged(merged, out, choice)
    return [f"merged model written to {out} in {choice.name} ({choice.reason}); it loads with "
            "AutoModelForCausalLM.from_pretrained"] + notes


def _check_flags(fmt: str, dtype: str | None, gguf_type: str | None, adapter_only: bool, ollama: bool) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt} is not an export format; use {' or '.join(FORMATS)}.")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype} is not an export dtype; use one of {', '.join(EXPORT_DTYPES)}.")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type} is not supported; use one of {', '.join(GGUF_TYPES)}.")
    if adapter_only and (fmt != "safetensors" or dtype or gguf_type or ollama):
        raise ConfigError("--adapter-only copies the adapter as it was trained; it takes no --format, --dtype, "
                          "--gguf-type or --ollama. Leave those out, or leave out --adapter-only to export a "
                          "merged model.")
    if fmt != "gguf" and (gguf_type or ollama):
        raise ConfigError("--gguf-type and --ollama apply to GGUF exports: add --format gguf.")
    if gguf_type and dtype:
        raise ConfigError(f"--dtype {dtype} and --gguf-type {gguf_type} both set the precision of the GGUF file; "
                          "give one (--gguf-type q8_0 for an 8-bit file).")


def _export_gguf(merged: MergedRun, run: Path, out: Path, dtype: str | None, gguf_type: str | None,
                 ollama: bool) -> list[str]:
    if gguf_type is None:
        choice = export_dtype(dtype, merged.loaded.cfg.model)
        gguf_type, why = _GGUF_FOR_DTYPE[choice.name], choice.reason
    else:
        why = "as asked with --gguf-type"
    name = f"{run.resolve().name}-{gguf_type}.gguf"
    tokenizer = merged.tokenizer_for_export()
    vocab = gguf_vocab(tokenizer, merged.model.config.vocab_size, merged.loaded.template.end_of_turn)
    with atomic_dir(out) as tmp:
        notes = write_gguf(merged.model, vocab, tokenizer.chat_template, tmp / name, gguf_type, run.resolve().name)
        if ollama:
            write_text(tmp / MODELFILE, modelfile(name, merged.loaded.template))
    size = (out / name).stat().st_size / 2**20
    lines = [f"GGUF file {out / name} written in {gguf_type} ({why}), {size:.1f} MiB, for llama.cpp and Ollama"]
    if ollama:
        lines.append(f"Ollama: ollama create {run.resolve().name} -f {out / MODELFILE}")
    return lines + [f"note: {note}" for note in notes]
