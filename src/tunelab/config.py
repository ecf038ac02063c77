"""Typed, validated run configuration.

One YAML file describes one run; ``key.sub=value`` overrides on the command line patch it.
Every section forbids unknown keys, and a misspelt key is reported with the nearest valid
one. The fully resolved config is written into the run directory so that every later
command (chat, predict, export, serve, eval) needs only the run's path.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError
from tunelab.io import write_text

DEFAULT_MODEL = "smollm2-135m-instruct"

MethodType = Literal[
    "full", "freeze", "lora", "dora", "rslora", "pissa", "loraplus", "qlora", "adalora", "ia3",
    "prefix", "prompt", "ptuning", "ptuning_v2",
    "houlsby", "pfeiffer", "parallel", "adapter_fusion", "mam",
]
Stage = Literal["pt", "sft", "rm", "dpo", "kto", "ppo"]


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    name_or_path: str = Field(DEFAULT_MODEL, description="Embedded model name, local HF directory, or .gguf file.")
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, when it is a directory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the frozen base weights; auto = float32 on CPU, bfloat16 on capable GPUs.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base through bitsandbytes (qlora sets 4bit when left at none).")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = Field("sdpa", description="sdpa, eager, flash_attention_2, ...")
    trust_remote_code: bool = False


class MethodConfig(Section):
    type: MethodType = "lora"
    init_from: str | None = Field(None, description="Continue training from the adapter of this run directory.")
    # LoRA family
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target: Union[str, list[str]] = Field("all-linear", description="'all-linear', a module name, or a list.")
    modules_to_save: list[str] = Field(default_factory=list)
    use_dora: bool = False
    use_rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: learning rate of B = lr x ratio.")
    # AdaLoRA
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    # IA3
    feedforward_modules: list[str] | None = None
    # freeze-tuning
    trainable_layers: int = Field(2, ge=0, description="freeze: train the last N decoder layers.")
    trainable_modules: list[str] = Field(default_factory=list, description="freeze: extra name patterns to train.")
    # prompt learning
    num_virtual_tokens: int = Field(20, gt=0)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    encoder_type: Literal["mlp", "lstm"] = "mlp"
    prompt_init_text: str | None = Field(
        None, description="prompt: initialise the virtual tokens at this text's embeddings; prefix, ptuning_v2 and "
                          "mam (without prefix_projection): at the base's key/values of this text.")
    # bottleneck adapters
    reduction_factor: int = Field(16, gt=0, description="Adapter bottleneck = hidden size / reduction_factor.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scaling: float = 1.0
    drop_layers: int = Field(0, ge=0, description="AdapterDrop: skip adapters in the first N layers.")
    drop_at: Literal["train", "inference", "both"] = "both"
    fusion_adapters: list[str] = Field(default_factory=list, description="adapter_fusion: run dirs of trained adapters.")


class DataConfig(Section):
    dataset_dir: str = Field("data", description="Directory holding dataset_info.json (LLaMA-Factory layout).")
    train: list[str] = Field(default_factory=list, description="Registry names or file paths.")
    eval: list[str] = Field(default_factory=list)
    weights: list[float] | None = Field(None, description="Mixing weights for data.train (sampling probabilities).")
    max_length: int = Field(1024, gt=8)
    max_samples: int | None = Field(None, gt=0)
    eval_split: float = Field(0.0, ge=0, description="Fraction (<1) or count (>=1) of train held out for eval.")
    template: str = Field("auto", description="auto = the tokenizer's chat template; or chatml, llama3, alpaca.")
    system: str | None = Field(None, description="System prompt used when a record has none.")
    train_on_prompt: bool = False
    mask_history: bool = False
    packing: Union[bool, Literal["auto"]] = Field(
        "auto", description="true: examples packed into one row that never attend to each other (padding-free; "
                            "fastest with flash-attention's varlen kernels). false: length-grouped right padding "
                            "without an attention mask (fused causal SDPA; fastest on CPU). auto: true only under "
                            "flash_attention_*.")
    pad_to_multiple_of: int = Field(64, ge=1, description="Padded batches: round the width up to a multiple of "
                                                          "this (never beyond max_length), so few distinct shapes "
                                                          "reuse compiled kernels. 1 = longest example.")
    group_by_length: bool = True
    separate_documents: bool = Field(True, description="pt: documents never attend to each other in a block.")
    on_error: Literal["raise", "skip"] = "raise"

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Overrides epochs when set.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = 42
    log_every: int = Field(1, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    eval_every: int | None = Field(None, gt=0)
    eval_base: bool = Field(False, description="Before training, evaluate the base model (method switched off) "
                                               "and log base_eval_loss, to see whether fine-tuning helped.")
    gradient_checkpointing: bool = False
    loss_chunk_size: int = Field(256, ge=0, description="Tokens per chunk of the LM-head loss; 0 = unchunked. "
                                                         "Smaller chunks hold fewer logits (49k vocab: 256 rows = 50 MB "
                                                         "in fp32) at no measured speed cost.")
    auto_batch_size: bool = Field(False, description="On out-of-memory, split micro-batches in two and double "
                                                      "accumulation (global batch unchanged).")


class PrefConfig(Section):
    """Preference stages (rm, dpo, kto)."""

    loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    ftx: float = Field(0.0, ge=0, description="Weight of an added SFT loss on the chosen answers.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    simpo_gamma: float = 0.5
    ref_on_cpu: bool = Field(False, description="Full fine-tuning: keep the frozen reference copy on CPU.")
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class PPOConfig(Section):
    reward_model: str | None = Field(None, description="Run directory of a trained reward model (stage rm).")
    reward_fn: str | None = Field(None, description="'module:function' scoring (prompt, response) -> float.")
    rollout_batch_size: int = Field(8, gt=0)
    mini_batch_size: int = Field(4, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = Field(0.05, ge=0)
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = True


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    stage: Stage = "sft"
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pref: PrefConfig = Field(default_factory=PrefConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    output_dir: str = "runs/run"

    @model_validator(mode="after")
    def _qlora_loads_a_4bit_base(self) -> "RunConfig":
        """QLoRA means LoRA on a 4-bit base: load it so unless a quantization was chosen."""
        if self.method.type == "qlora" and self.model.quantization == "none":
            self.model.quantization = "4bit"
        return self


# ---------------------------------------------------------------------------- loading

def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, f"{dotted}."))
    return keys


VALID_KEYS = _valid_keys(RunConfig)


def _describe_type(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Human-readable expected type of the field at ``loc``."""
    current: Any = model
    field = None
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            break
        field = current.model_fields[part]
        current = field.annotation
    if field is None:
        return "a valid value"
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _suggest_key(key: str) -> str | None:
    """Nearest valid key: a close spelling in the same section, else the same name in another section."""
    section, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in VALID_KEYS if k.rpartition(".")[0] == section]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.75)
    if close:
        return f"{section}.{close[0]}" if section else close[0]
    elsewhere = [k for k in VALID_KEYS if k.rpartition(".")[2] == leaf]
    if elsewhere:
        return elsewhere[0]
    close = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.6)
    return close[0] if close else None


def _format_validation_error(err: ValidationError, source: str) -> ConfigError:
    problems = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if not isinstance(p, int))
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            close = _suggest_key(key)
            hint = f" Did you mean '{close}'?" if close else ""
            problems.append(f"unknown key '{key}'.{hint}")
        else:
            problems.append(f"key '{key}' = {item.get('input')!r} is invalid: {item['msg']} "
                            f"(expected {_describe_type(RunConfig, loc)}).")
    return ConfigError(f"{source}: " + " ".join(problems)
                       + " Fix the YAML or the command-line override; valid keys are listed by "
                         "`tunelab config-keys`.")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (['train', 'lr'], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' has no '='. Write overrides as key.sub=value, e.g. train.lr=1e-4.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is a value, not a section.")
        node = child
    node[path[-1]] = value


def build_config(tree: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> RunConfig:
    """Validate a raw dict (plus ``key=value`` overrides) into a :class:`RunConfig`."""
    tree = copy.deepcopy(tree or {})  # overrides must not write into the caller's nested dicts
    for text in overrides or []:
        path, value = parse_override(text)
        _apply_override(tree, path, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise _format_validation_error(err, source) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or start from defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist. Pass the path of a YAML run file, "
                              "e.g. examples/quickstart.yaml.")
        try:
            tree = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {file}{where}: not valid YAML ({getattr(err, 'problem', err)}). "
                              "Check indentation and quoting there.") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {file}: the top level must be a mapping of sections "
                              "(model, method, stage, data, train, output_dir).")
        source = str(file)
    return build_config(tree, overrides, source)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    file = Path(run_dir) / "config.yaml"
    if not file.is_file():
        raise ConfigError(f"{run_dir} is not a tunelab run directory: {file} is missing. Pass the output_dir "
                          "of a finished `tunelab train` run.")
    return load_config(file)
