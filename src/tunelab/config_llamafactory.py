"""LLaMA-Factory training YAMLs, unchanged.

A LLaMA-Factory YAML is one flat mapping of LLaMA-Factory's and Hugging Face
``TrainingArguments``' names (``model_name_or_path``, ``stage``, ``finetuning_type``,
``lora_rank``, ``dataset``, ``learning_rate``, ...). :func:`convert` puts each key into
tunelab's sections (the plain renames come from :data:`tunelab.config.KEY_ALIASES`, so the
key hints and this converter never disagree). A key that means nothing here (worker counts,
cache switches, plotting, DDP timeouts) is reported once, with the reason, never dropped
silently; a key this module does not know is an error, because it may change what is
trained. Keys the file leaves out take LLaMA-Factory's defaults where those differ from
tunelab's (3 epochs, batch 8, lr 5e-5, linear decay, 2048 tokens, lora_alpha = 2 x rank,
fp32 unless bf16/fp16, gradient checkpointing on), so the run trains what LLaMA-Factory
would have trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tunelab.config import KEY_ALIASES, RunConfig, build_config, read_yaml
from tunelab.errors import ConfigError

#: Keys whose presence marks a LLaMA-Factory file (tunelab nests these under sections).
_MARKERS = ("model_name_or_path", "finetuning_type", "dataset", "cutoff_len", "per_device_train_batch_size")

#: tunelab's top-level sections: a file with any of them as a mapping is a tunelab file.
_SECTIONS = ("model", "method", "data", "train", "pref", "ppo")

#: What LLaMA-Factory (and Hugging Face) use when a key is absent, where tunelab's default differs.
_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "learning_rate": 5e-5,
    "lr_scheduler_type": "linear", "cutoff_len": 2048, "disable_gradient_checkpointing": False,
    "finetuning_type": "lora", "bf16": False,
}

#: Keys that have no effect in tunelab, and why: reported once, never dropped silently.
_IGNORED: dict[str, str] = {
    "overwrite_cache": "the tokenized cache is keyed by the data and settings, so it is never stale",
    "preprocessing_num_workers": "tokenization is not split over worker processes",
    "dataloader_num_workers": "batches are built in the training process",
    "plot_loss": "loss.png is always written",
    "ddp_timeout": "no DDP timeout is set from a config",
    "ddp_find_unused_parameters": "no DDP option is set from a config",
    "report_to": "metrics go to metrics.jsonl; experiment trackers are not set from a config",
    "logging_dir": "logs go to the run directory",
    "run_name": "the run is named by output_dir",
    "save_only_model": "checkpoints always hold optimizer and scheduler state, for --resume",
    "per_device_eval_batch_size": "evaluation uses train.batch_size",
    "do_eval": "evaluation follows data.eval / data.eval_split",
    "do_predict": "predict with `tunelab predict RUN` after training",
    "pissa_convert": "a PiSSA adapter is always saved as a plain LoRA relative to the original base",
    "enable_liger_kernel": "a kernel choice, not a training setting",
    "use_unsloth": "a kernel choice, not a training setting",
    "deepspeed": "DeepSpeed JSON configs are not read",
    "cache_dir": "hub downloads go to the standard hub cache; set HF_HUB_CACHE (or HF_HOME) to move it",
    "hf_hub_token": "credentials are not read from a config file; log in with `hf auth login` or set HF_TOKEN",
    "low_cpu_mem_usage": "transformers 5 always loads weights without building a random copy first",
    "print_param_status": "a debugging printout; `tunelab estimate` reports the trainable parameters",
}

#: LLaMA-Factory templates that are no model's own chat format, so a tokenizer does not carry
#: them: they map only to a tunelab template of the same name.
_GENERIC_TEMPLATES = ("default", "empty", "fewshot", "vicuna", "chatml_de")


@dataclass
class Conversion:
    """A LLaMA-Factory file as a tunelab config tree, plus what did not carry over."""

    source: str
    tree: dict[str, Any] = field(default_factory=dict)
    #: LLaMA-Factory key -> why it has no effect in tunelab.
    ignored: dict[str, str] = field(default_factory=dict)
    #: How a value was interpreted, where that is worth knowing (templates, checkpoints).
    notes: list[str] = field(default_factory=list)
    #: ``overwrite_output_dir`` / ``resume_from_checkpoint``: options of ``tunelab train``.
    overwrite: bool = False
    resume: bool = False

    def set(self, key: str, value: Any) -> None:
        """Set the dotted tunelab ``key`` in :attr:`tree`."""
        *sections, leaf = key.split(".")
        node = self.tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value

    def config(self, overrides: list[str] | None = None) -> RunConfig:
        """The validated run config (tunelab ``key=value`` overrides on top)."""
        return build_config(self.tree, overrides, f"{self.source} (LLaMA-Factory config)")

    def notice(self) -> str:
        """One paragraph: which keys were ignored and why, and the notes."""
        parts = [f"{self.source} is a LLaMA-Factory config; tunelab runs its tunelab equivalent "
                 "(`tunelab config convert` prints it)."]
        if self.ignored:
            parts.append("Ignored, no effect in tunelab: "
                         + "; ".join(f"{key} ({why})" for key, why in self.ignored.items()) + ".")
        parts.extend(self.notes)
        return " ".join(parts)

    def to_yaml(self) -> str:
        """The equivalent tunelab YAML, with what did not carry over as comments above it."""
        tree = _in_schema_order(self.config(), self.tree)
        flags = [flag for flag, on in (("--overwrite", self.overwrite), ("--resume", self.resume)) if on]
        lines = [f"# tunelab equivalent of the LLaMA-Factory config {self.source}"]
        lines += [f"# ignored: {key} ({why})" for key, why in self.ignored.items()]
        lines += [f"# note: {note}" for note in self.notes]
        if flags:
            lines.append(f"# train it with: tunelab train FILE {' '.join(flags)}")
        return "\n".join(lines) + "\n" + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def _in_schema_order(model: BaseModel, tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` with keys in the order ``config-keys`` lists them (sections, then their keys)."""
    ordered = {}
    for name in type(model).model_fields:
        if name in tree:
            value = getattr(model, name)
            ordered[name] = _in_schema_order(value, tree[name]) if isinstance(value, BaseModel) else tree[name]
    return ordered


# ---------------------------------------------------------------------------- value converters

def _names(value: Any) -> list[str]:
    """``"a, b"`` or ``[a, b]`` -> ``["a", "b"]`` (LLaMA-Factory writes lists comma-separated)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def _lora_target(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    names = _names(value)
    out.set("method.target", "all-linear" if names == ["all"] else names)


def _finetuning_type(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if value not in ("lora", "freeze", "full"):
        raise ConfigError(f"{out.source}: finetuning_type '{value}' has no tunelab equivalent here. Use lora, "
                          "freeze or full, or write a tunelab config (method.type: one of `tunelab config-keys`).")
    out.set("method.type", "qlora" if value == "lora" and lf.get("quantization_bit") == 4 else value)


def _quantization_bit(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if value is None:
        return
    if value not in (4, 8):
        raise ConfigError(f"{out.source}: quantization_bit {value!r} is not supported; tunelab quantizes the base "
                          "through bitsandbytes in 4 or 8 bits.")
    out.set("model.quantization", f"{value}bit")


def _quantization_method(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    """bitsandbytes (LLaMA-Factory's default) is how tunelab quantizes; hqq, eetq and the others are not."""
    if value != "bnb":
        raise ConfigError(f"{out.source}: quantization_method {value!r} is not supported; tunelab quantizes the base "
                          "on the fly through bitsandbytes only (quantization_method: bnb, or leave it out).")


def _model_revision(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    """A branch, tag or commit of a hub model; LLaMA-Factory's default ``main`` is tunelab's unset
    ``model.revision`` (which a local model must leave unset)."""
    if value not in (None, "main"):
        out.set("model.revision", str(value))


def _precision(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    """bf16 / fp16 / pure_bf16 together; none of them means fp32, as in Hugging Face's Trainer."""
    if lf.get("pure_bf16"):
        out.set("model.dtype", "bfloat16")
    precision = "bf16" if lf.get("bf16") or lf.get("pure_bf16") else "fp16" if lf.get("fp16") else "fp32"
    out.set("train.precision", precision)


_ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "fa2": "flash_attention_2"}
_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
               "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
               "paged_adamw_32bit": "paged_adamw_32bit", "sgd": "sgd"}
#: tunelab's "constant" keeps the warmup, like Hugging Face's "constant_with_warmup".
_SCHEDULERS = {"constant_with_warmup": "constant"}


def _choice(key: str, table: Mapping[str, str]) -> Callable[[Any, Conversion, Mapping[str, Any]], None]:
    """A value that must be one of ``table``'s keys; it becomes the matching tunelab value."""
    def convert(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
        if value not in table:
            raise ConfigError(f"{out.source}: {value!r} has no tunelab equivalent for {key}; supported: "
                              f"{', '.join(table)}.")
        out.set(key, table[value])
    return convert


def _scheduler(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    out.set("train.scheduler", _SCHEDULERS.get(value, value))


def _adam_betas(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    out.set("train.adam_betas", [lf.get("adam_beta1", 0.9), lf.get("adam_beta2", 0.999)])


def _max_steps(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if value is not None and value > 0:  # Hugging Face's -1 means "use the epochs"
        out.set("train.max_steps", value)


def _eval_strategy(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if value == "steps":
        out.set("train.eval_every", lf.get("eval_steps") or lf.get("logging_steps") or 500)
    elif value == "epoch":
        out.ignored["eval_strategy"] = ("tunelab evaluates every train.eval_every steps and at the end, not per "
                                        "epoch")
    elif value != "no":
        raise ConfigError(f"{out.source}: eval_strategy {value!r} is not one of steps, epoch, no.")


def _val_size(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if lf.get("eval_dataset"):
        out.ignored["val_size"] = "eval_dataset is given and is evaluated instead of a held-out split"
    else:
        out.set("data.eval_split", value)


def _eval_steps(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if lf.get("eval_strategy", "no") != "steps":
        out.ignored["eval_steps"] = "eval_strategy is not 'steps'"


def _do_train(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if not value:
        raise ConfigError(f"{out.source}: do_train is false, so this config does not train. Evaluate or predict "
                          "with `tunelab eval RUN` / `tunelab predict RUN` instead.")


def _overwrite(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    out.overwrite = bool(value) and not lf.get("resume_from_checkpoint")


def _resume(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if value:
        out.resume = True
        out.notes.append(f"resume_from_checkpoint: training continues from the latest checkpoint in output_dir "
                         f"(tunelab's --resume), not from {value}.")


def _gradient_checkpointing(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    out.set("train.gradient_checkpointing", not value)


def _pissa_init(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if value:
        out.set("method.init", "pissa")


def _freeze_trainable_modules(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    if _names(value) != ["all"]:
        raise ConfigError(f"{out.source}: freeze_trainable_modules {value!r} is not supported: tunelab trains whole "
                          "layers (method.trainable_layers) plus named modules (freeze_extra_modules -> "
                          "method.trainable_modules). Remove it, or list the modules in freeze_extra_modules.")


def _packing(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    """tunelab's packing already keeps packed examples from attending to each other, which is
    what LLaMA-Factory's neat_packing adds; unset (None) leaves tunelab's choice."""
    if lf.get("neat_packing"):
        out.set("data.packing", True)
    elif lf.get("packing") is not None:
        out.set("data.packing", bool(lf["packing"]))


def _template(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
    from tunelab.data.templates import BUILTIN_TEMPLATES

    if value in BUILTIN_TEMPLATES:
        out.set("data.template", value)
    elif value in _GENERIC_TEMPLATES:
        raise ConfigError(f"{out.source}: LLaMA-Factory's template '{value}' has no tunelab equivalent. Use one of "
                          f"{', '.join(BUILTIN_TEMPLATES)}, or remove the key to train in the tokenizer's own chat "
                          "format.")
    else:
        out.set("data.template", "auto")
        out.notes.append(f"template '{value}': the tokenizer's own chat template (data.template: auto), the format "
                         "LLaMA-Factory's template of that name reproduces.")


def _split(key: str) -> Callable[[Any, Conversion, Mapping[str, Any]], None]:
    """A comma-separated list (LLaMA-Factory) or a YAML list -> a list at ``key``."""
    def convert(value: Any, out: Conversion, lf: Mapping[str, Any]) -> None:
        out.set(key, _names(value))
    return convert


#: LLaMA-Factory keys whose value changes form (everything else with a KEY_ALIASES entry is renamed).
_CONVERTERS: dict[str, Callable[[Any, Conversion, Mapping[str, Any]], None]] = {
    "dataset": _split("data.train"), "eval_dataset": _split("data.eval"), "template": _template,
    "finetuning_type": _finetuning_type, "lora_target": _lora_target,
    "additional_target": _split("method.modules_to_save"), "freeze_extra_modules": _split("method.trainable_modules"),
    "freeze_trainable_modules": _freeze_trainable_modules, "pissa_init": _pissa_init,
    "quantization_bit": _quantization_bit, "quantization_method": _quantization_method,
    "model_revision": _model_revision, "bf16": _precision, "fp16": _precision, "pure_bf16": _precision,
    "flash_attn": _choice("model.attn_implementation", _ATTENTION),
    "optim": _choice("train.optimizer", _OPTIMIZERS), "lr_scheduler_type": _scheduler,
    "adam_beta1": _adam_betas, "adam_beta2": _adam_betas, "max_steps": _max_steps,
    "val_size": _val_size, "eval_strategy": _eval_strategy, "eval_steps": _eval_steps, "do_train": _do_train,
    "overwrite_output_dir": _overwrite, "resume_from_checkpoint": _resume,
    "disable_gradient_checkpointing": _gradient_checkpointing, "packing": _packing, "neat_packing": _packing,
}


# ---------------------------------------------------------------------------- the conversion

def is_llamafactory(tree: Mapping[str, Any]) -> bool:
    """Whether a parsed YAML is a LLaMA-Factory training config: flat LLaMA-Factory keys and no
    tunelab section (``model:``, ``method:``, ... as mappings)."""
    if any(isinstance(tree.get(section), Mapping) for section in _SECTIONS):
        return False
    return any(key in tree for key in _MARKERS)


def convert(lf: Mapping[str, Any], source: str = "config") -> Conversion:
    """Map every key of a LLaMA-Factory config; unknown keys are one ConfigError naming them all."""
    unknown = [key for key in lf if key not in _CONVERTERS and key not in _IGNORED and key not in KEY_ALIASES]
    if unknown:
        raise ConfigError(f"{source}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not LLaMA-Factory "
                          "training keys tunelab knows, and could change what is trained. Remove them, or convert "
                          "the rest (`tunelab config convert`) and set the tunelab equivalents (`tunelab "
                          "config-keys`).")
    settings = {**_DEFAULTS, **lf}
    if settings.get("finetuning_type", "lora") == "lora" and "lora_alpha" not in settings:
        settings["lora_alpha"] = 2 * settings.get("lora_rank", 8)  # LLaMA-Factory's default alpha
    out = Conversion(source)
    for key, value in settings.items():
        if key in _CONVERTERS:
            _CONVERTERS[key](value, out, settings)
        elif key in _IGNORED:
            out.ignored[key] = _IGNORED[key]
        else:
            out.set(KEY_ALIASES[key], value)
    return out


def read_llamafactory(path: str | Path) -> Conversion | None:
    """The conversion of the YAML at ``path`` when it is a LLaMA-Factory config, else None."""
    tree = read_yaml(path)
    return convert(tree, str(path)) if is_llamafactory(tree) else None
