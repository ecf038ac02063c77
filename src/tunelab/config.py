"""Typed, validated run configuration.

One YAML file describes one run; ``key.sub=value`` overrides on the command line patch it.
Every section forbids unknown keys, and a misspelt key is reported with the nearest valid
one (names users bring from LLaMA-Factory and Hugging Face are recognised). The fully
resolved config is written into the run directory so that every later command (chat,
predict, export, serve, eval) needs only the run's path.

The ``method`` section is a union discriminated by ``method.type``: each method declares
its config class next to its implementation in :mod:`tunelab.methods`, and the methods
registry says which class a type uses, so a key that does not apply to the chosen type
is an error rather than silently unused. This module defines the part every type shares
(:class:`MethodConfig`); it reads the registry lazily, because the method modules build
on this one.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidatorFunctionWrapHandler,
                      field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from tunelab.errors import ConfigError
from tunelab.io import write_text
from tunelab.train.stages import STAGE_NAMES

DEFAULT_MODEL = "smollm2-135m-instruct"
#: The method a config without ``method.type`` trains.
DEFAULT_METHOD = "lora"

#: Training stages, from the stage registry (one module per stage in tunelab/train/stages/).
Stage = Literal[STAGE_NAMES]  # type: ignore[valid-type]
#: Experiment trackers ``train.report_to`` may name (implemented in :mod:`tunelab.trackers`).
TrackerName = Literal["tensorboard", "mlflow", "wandb", "trackio"]


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    #: The stages that read this section; empty = every stage (``config-keys --stage`` narrows by it).
    stages: ClassVar[tuple[str, ...]] = ()


class RopeScaling(Section):
    """RoPE scaling written into the model config at load (transformers' ``rope_parameters``)."""

    type: Literal["linear", "yarn", "dynamic"] = Field(
        "linear", description="linear: positions divided by factor; yarn: NTK-by-parts interpolation; dynamic: "
                              "NTK scaling that grows with the sequence.")
    factor: float = Field(gt=1.0, description="Context multiple over the model's max_position_embeddings.")


class ModelConfig(Section):
    """The base model and how it is loaded."""

    name_or_path: str = Field(DEFAULT_MODEL, description="Embedded model name, local HF directory, .gguf file, or a "
                                                        "Hugging Face hub id (org/name; downloaded once into the hub "
                                                        "cache, HF_HOME and HF_HUB_OFFLINE honoured).")
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, when it is a directory "
                                                    "or a hub repository.")
    revision: str | None = Field(None, description="Hub id only: branch, tag or commit to download (default: main).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the frozen base weights; auto = float32 on CPU, bfloat16 on capable GPUs.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base through bitsandbytes (qlora sets 4bit when left at none).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (QLoRA's normal float) or fp4.")
    double_quant: bool = Field(True, description="4-bit: quantize the quantization constants too (less memory).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype 4-bit layers compute in; auto = the dtype of the float parts.")
    attn_implementation: str = Field("sdpa", description="Attention kernel: sdpa, eager, flash_attention_2, ...")
    rope_scaling: RopeScaling | None = Field(
        None, description="Stretch the rotary position embedding past the positions the model was trained on, "
                          "e.g. {type: linear, factor: 4} for 4x the context (yarn: better quality unfinetuned).")
    trust_remote_code: bool = Field(False, description="Allow Python code shipped with the model to run on load.")


class _ConfigForType(type(BaseModel)):  # type: ignore[misc]
    """Metaclass of :class:`MethodConfig`: calling the base class builds the config of ``type``.

    ``MethodConfig(type="houlsby", reduction_factor=4)`` returns the Houlsby config, so code
    that only knows a type name (tests, ``compare``, notebooks) needs no lookup. It keeps the
    keys that apply to that type and drops the rest, like ``compare`` does with settings meant
    for other methods; the per-type classes themselves, YAML files and overrides are strict.
    """

    def __call__(cls, *args: Any, **data: Any) -> Any:
        if cls is not MethodConfig or args:
            return super().__call__(*args, **data)
        target = method_config_class(data.get("type", DEFAULT_METHOD))
        applicable = {key: value for key, value in data.items() if key in target.model_fields}
        return super(_ConfigForType, target).__call__(**applicable)


class MethodConfig(Section, metaclass=_ConfigForType):
    """What every method type has; each type's own keys live in its config class in methods/."""

    type: str = Field(DEFAULT_METHOD, description="The fine-tuning method; `tunelab config-keys --method TYPE` "
                                                  "lists the keys of one type.")
    init_from: str | None = Field(None, description="Continue training from the weights of this run directory.")

    @model_validator(mode="after")
    def _type_uses_this_class(self) -> "MethodConfig":
        """A per-type class only configures the types registered with it."""
        expected = method_config_class(self.type)
        if expected is not type(self):
            raise ValueError(f"method.type '{self.type}' is configured by {expected.__name__}, not "
                             f"{type(self).__name__}")
        return self


#: The package whose import registers every method type with its config class.
METHODS_PACKAGE = "tunelab.methods"


def registered_methods() -> dict[str, Any]:
    """``tunelab.methods.METHODS``: method type -> its ``Method`` class.

    Resolved by name when first needed, like the stage registry resolves stage modules: the
    method modules build on this one (their config classes subclass :class:`MethodConfig`),
    so this module cannot import them, yet validating ``method:`` needs their classes.
    """
    return importlib.import_module(METHODS_PACKAGE).METHODS


def method_config_classes() -> dict[str, type[MethodConfig]]:
    """Every registered method type -> its config class (declared beside the method)."""
    return {name: method.config_class for name, method in registered_methods().items()}


def method_config_class(type_name: str) -> type[MethodConfig]:
    """The config class of ``method.type``; an unknown type is a ValidationError on ``type``."""
    classes = method_config_classes()
    if type_name not in classes:
        close = difflib.get_close_matches(str(type_name), classes, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        error = PydanticCustomError("method_type", "'{name}' is not a method type.{hint} Known types: {known}",
                                    {"name": type_name, "hint": hint, "known": ", ".join(sorted(classes))})
        raise ValidationError.from_exception_data(
            "MethodConfig", [InitErrorDetails(type=error, loc=("type",), input=type_name)])
    return classes[type_name]


def keep_applicable(section: Mapping[str, Any], type_name: str) -> dict[str, Any]:
    """The keys of a method section that apply to ``type_name`` (``type`` set to it).

    Used where keys were written for another type: a saved run config from before per-type
    method configs (every key of every type), or an override that switches ``method.type``.
    """
    fields = method_config_class(type_name).model_fields
    return {**{key: value for key, value in section.items() if key in fields}, "type": type_name}


class DataConfig(Section):
    """Which datasets, and how records become training rows."""

    dataset_dir: str = Field("data", description="Directory holding dataset_info.json (LLaMA-Factory layout).")
    train: list[str] = Field(default_factory=list, description="Training datasets: registry names or file paths.")
    eval: list[str] = Field(default_factory=list, description="Evaluation datasets: registry names or file paths.")
    weights: list[float] | None = Field(None, description="Mixing weights for data.train (sampling probabilities).")
    max_length: int = Field(1024, gt=8, description="Tokens per example; longer examples are truncated.")
    max_samples: int | None = Field(None, gt=0, description="Use at most this many records of each dataset.")
    eval_split: float = Field(0.0, ge=0, description="Fraction (<1) or count (>=1) of train held out for eval.")
    template: str = Field("auto", description="auto = the tokenizer's chat template; or chatml, llama3, alpaca.")
    system: str | None = Field(None, description="System prompt used when a record has none.")
    train_on_prompt: bool = Field(False, description="Also train on the prompt tokens, not only on the answers.")
    mask_history: bool = Field(False, description="Multi-turn: train only on the last answer, not earlier ones.")
    packing: Union[bool, Literal["auto"]] = Field(
        "auto", description="true: pack examples into rows where they never attend to each other (padding-free, "
                            "fastest under flash-attention varlen); false: length-grouped padding (fastest on "
                            "CPU); auto: true only under flash_attention_*.")
    pad_to_multiple_of: int = Field(64, ge=1, description="Padded batches: round the width up to a multiple of "
                                                          "this (never beyond max_length) so compiled kernels are "
                                                          "reused; 1 = longest example.")
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding).")
    separate_documents: bool = Field(True, description="pt: documents never attend to each other in a block.")
    on_error: Literal["raise", "skip"] = Field("raise", description="A malformed record stops the run, or is "
                                                                    "skipped and counted.")
    num_workers: int | None = Field(None, ge=1, description="Processes that convert and tokenize (datasets map "
                                                             "num_proc); null = the number of CPU cores.")
    cache_dir: str | None = Field(None, description="Tokenized-dataset cache; null = $TUNELAB_CACHE/data "
                                                    "(default ~/.cache/tunelab/data).")
    streaming: bool = Field(False, description="pt/sft: read, tokenize, shuffle and pack on the fly instead of "
                                               "caching (corpora larger than memory or disk).")
    shuffle_buffer: int = Field(10000, gt=0, description="streaming: records shuffled together (one window).")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A memory size in bytes: SI units (kB, MB, GB, TB: powers of 1000), IEC units (KiB, MiB,
    GiB, TiB: powers of 1024), case-insensitive; a bare number is bytes. ValueError otherwise."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"'{text}' is not a memory size: write a number and a unit such as 2GB, 1.5GiB or "
                         "512MiB (GB = 10^9 bytes, GiB = 2^30), or 'auto' for a share of the available memory")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"'{text}' is not a memory size a run can fit in: give a positive size such as 2GB")
    return size


class TrainConfig(Section):
    """The optimisation: length, batch, learning rate, precision, logging and checkpoints."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: Union[Annotated[float, Field(gt=0)], Literal["auto"]] = Field(
        "auto", description="Peak learning rate; auto = the method family's rate for this stage "
                            "(tunelab.method_defaults; printed at train start, saved in the run's config.yaml).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of the steps spent warming the lr up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio when set.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null = no clipping.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = Field(
        "adamw", description="Optimizer; the 8-bit and paged ones need bitsandbytes.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2).")
    adam_eps: float = Field(1e-8, description="AdamW's epsilon.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision; auto = bf16 where supported, fp16 on older GPUs, else fp32.")
    seed: int = Field(42, description="Seed of initialisation, data order and dropout.")
    log_every: int = Field(1, gt=0, description="Write metrics every N optimizer steps.")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (for --resume); null = never.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (and always at the end).")
    eval_base: bool = Field(False, description="Before training, log the base model's eval loss (method "
                                               "switched off), to see whether fine-tuning helped.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: "
                                                            "less memory, slower steps.")
    compile: bool = Field(False, description="torch.compile the decoder layers (dynamic shapes, inductor's disk "
                                             "cache): fused elementwise work for a compile of about a minute "
                                             "at the start; see the README's speed section for when it pays.")
    loss_chunk_size: int = Field(256, ge=0, description="Tokens per chunk of the LM-head loss (fewer logits held "
                                                         "at once, no measured speed cost); 0 = unchunked.")
    auto_batch_size: bool = Field(False, description="On out-of-memory, split micro-batches in two and double "
                                                      "accumulation (global batch unchanged).")
    memory_budget: str | None = Field(
        None, description="Peak memory the run must fit in, e.g. 2GB or 1.5GiB, or auto (80% of the memory "
                          "available at start): before the model loads, the memory estimator picks gradient "
                          "checkpointing, loss_chunk_size and a micro-batch split (batch_size down, grad_accum up, "
                          "global batch unchanged) that fit, fastest first. null = use the settings as given.")
    compact_heap: Union[bool, Literal["auto"]] = Field(
        "auto", description="CPU (glibc): return every freed block of 1 MiB or more to the system, so resident "
                            "memory follows the live tensors instead of growing with the C heap's leftovers; "
                            "each new activation then faults its pages in again (slower steps: 0.65x tokens/s "
                            "at length 512, micro-batch 8). auto = on with train.memory_budget or with "
                            "data.max_length above 8192 tokens.")
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="How several processes (torchrun, accelerate launch, --nproc-per-node) train one model: "
                            "ddp (replicas), fsdp (FSDP2: parameters, gradients and optimizer state sharded), "
                            "deepspeed (GPU only, with train.deepspeed); auto = ddp with several processes. "
                            "train.grad_accum is per process.")
    deepspeed: str | None = Field(None, description="Path of a DeepSpeed JSON config, read with "
                                                    "train.distributed=deepspeed.")
    report_to: list[TrackerName] = Field(
        default_factory=list, description="Experiment trackers that also get every logged metric (main process "
                                          "only): tensorboard, mlflow, wandb, trackio. Empty: nothing is sent.")

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget_is_a_size(cls, value: Any) -> Any:
        """A size ("2GB", "1.5GiB", a number of bytes) or auto; kept as written."""
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            return value
        if str(value).strip().lower() == "auto":
            return "auto"
        parse_size(str(value))
        return str(value)

    def set_auto_lr(self, lr: float) -> None:
        """Replace ``lr: auto`` by the rate it resolves to. The number still counts as unset: a dump
        of the set keys only re-resolves it (for another method), and :attr:`lr_is_auto` says so."""
        self.lr = lr
        self.model_fields_set.discard("lr")

    @property
    def lr_is_auto(self) -> bool:
        """Whether ``lr`` came from ``auto`` rather than from a number in the config."""
        return "lr" not in self.model_fields_set

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        """LLaMA-Factory writes one name, or "none"."""
        if isinstance(value, str):
            return [] if value == "none" else [value]
        return value


class PrefConfig(Section):
    """Preference stages (rm, dpo, kto) and the reference model of ppo and grpo."""

    stages: ClassVar[tuple[str, ...]] = ("rm", "dpo", "kto", "ppo", "grpo")

    loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = Field(
        "sigmoid", description="Preference loss: sigmoid (DPO), ipo, hinge, orpo or simpo.")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")
    ftx: float = Field(0.0, ge=0, description="Weight of an added SFT loss on the chosen answers.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (sigmoid "
                                                                  "loss: conservative DPO).")
    simpo_gamma: float = Field(0.5, description="SimPO's target reward margin.")
    ref_on_cpu: bool = Field(False, description="Full fine-tuning: keep the frozen reference copy on CPU.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: loss weight of desirable answers.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: loss weight of undesirable answers.")


class PPOConfig(Section):
    """PPO: where rewards come from, rollouts, and the clipped policy/value updates."""

    stages: ClassVar[tuple[str, ...]] = ("ppo",)

    reward_model: str | None = Field(None, description="Run directory of a trained reward model (stage rm).")
    reward_fn: str | None = Field(None, description="'module:function' scoring (prompt, response) -> float.")
    rollout_batch_size: int = Field(8, gt=0, description="Prompts answered per PPO step.")
    mini_batch_size: int = Field(4, gt=0, description="Rollouts per policy update.")
    ppo_epochs: int = Field(2, gt=0, description="Passes over each step's rollouts.")
    max_new_tokens: int = Field(32, gt=0, description="Longest sampled answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_k: int = Field(0, description="Sample among the k most likely tokens; 0 = all.")
    top_p: float = Field(1.0, description="Nucleus sampling threshold of the rollouts.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty against the reference model.")
    gamma: float = Field(1.0, description="Discount factor of the returns.")
    lam: float = Field(0.95, description="GAE lambda of the advantages.")
    cliprange: float = Field(0.2, description="Clip of the policy ratio.")
    cliprange_value: float = Field(0.2, description="Clip of the value-function update.")
    vf_coef: float = Field(0.1, description="Weight of the value loss.")
    whiten_rewards: bool = Field(True, description="Normalise rewards per batch before computing advantages.")


class GRPOConfig(Section):
    """GRPO family (RL with verifiable rewards): groups of sampled answers, rule rewards, clipped updates."""

    stages: ClassVar[tuple[str, ...]] = ("grpo",)

    reward_fns: list[Union[str, dict[str, Any]]] = Field(
        default_factory=list, description="Reward functions: built-ins accuracy, format, length; 'module:function'; "
                                          "'path/to/file.py:function'; or {fn: ..., name: ..., <argument>: <value>}.")
    reward_weights: list[float] | None = Field(None, description="Weight of each reward function in the total; "
                                                                 "null = 1 each.")
    reward_inputs: Literal["text", "messages"] = Field(
        "text", description="Prompts and completions reach reward functions as strings, or as chat messages "
                            "(TRL's conversational format).")
    prompts_per_step: int = Field(4, gt=0, description="Prompts per step; each is answered num_generations times.")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt: the group G.")
    max_new_tokens: int = Field(64, gt=0, description="Longest sampled completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 = all.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold of the completions.")
    loss: Literal["grpo", "dapo", "bnpo", "dr_grpo", "gspo"] = Field(
        "dapo", description="Normalisation of the token losses: grpo (per completion, then mean), dapo (per token "
                            "of the step), bnpo (per token of the micro-batch), dr_grpo (constant), gspo "
                            "(sequence-level ratio).")
    advantage: Literal["group", "rloo"] = Field("group", description="Baseline: the group mean, or rloo (the "
                                                                     "mean of the other completions).")
    scale_rewards: bool | None = Field(None, description="Divide advantages by the group's reward std; null = "
                                                         "true, false for dr_grpo.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL to the reference (k3); 0 skips the reference "
                                               "forward.")
    epsilon: float | None = Field(None, gt=0, description="Lower clip of the ratio; null = 0.2 (3e-4 for gspo).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip (DAPO's clip-higher); null = 0.28 for "
                                                               "dapo, 4e-4 for gspo, else epsilon.")
    num_iterations: int = Field(1, gt=0, description="Optimizer updates per batch of completions; above 1 the "
                                                     "sampling policy's log-probs are kept for the ratio.")
    rollout_backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="What samples the completions: vllm (a CUDA GPU with vllm installed; plain LoRA, "
                            "unquantised, one process), transformers generate, or auto = vllm where it can.")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, description="vllm rollouts: share of the GPU's "
                                                                            "memory vLLM may take (the rest trains).")


class RunConfig(Section):
    """One run: what to train (model, method), on what (data), how (train, pref, ppo), and where."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model and how it is loaded.")
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: MethodConfig(type=DEFAULT_METHOD),
                                                 description="How the base model becomes trainable.")
    stage: Stage = Field("sft", description=f"Training stage: {', '.join(STAGE_NAMES)}.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets and their tokenization.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation, logging and checkpoints.")
    pref: PrefConfig = Field(default_factory=PrefConfig, description="Preference-stage settings.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO settings.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO-family settings.")
    output_dir: str = Field("runs/run", description="The run directory this run writes.")

    @field_validator("method", mode="wrap")
    @classmethod
    def _config_of_the_type(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> MethodConfig:
        """Validate a method section with the class of its ``type``: its keys, and only those."""
        if isinstance(value, MethodConfig):
            return value
        if isinstance(value, Mapping):
            return method_config_class(value.get("type", DEFAULT_METHOD)).model_validate(dict(value))
        return handler(value)

    @model_validator(mode="after")
    def _qlora_loads_a_4bit_base(self) -> "RunConfig":
        """QLoRA means LoRA on a 4-bit base: load it so unless a quantization was chosen."""
        if self.method.type == "qlora" and self.model.quantization == "none":
            self.model.quantization = "4bit"
        return self

    @model_validator(mode="after")
    def _resolve_auto_lr(self) -> "RunConfig":
        """``train.lr: auto`` becomes the method family's rate for this stage (:mod:`tunelab.method_defaults`),
        so every later reader (optimizer, config.yaml, trackers) sees a number."""
        if self.train.lr == "auto":
            from tunelab.method_defaults import default_lr  # builds on this module

            self.train.set_auto_lr(default_lr(self.method.type, self.stage))
        return self


# ---------------------------------------------------------------------------- key names

#: Names users bring from LLaMA-Factory and Hugging Face ``TrainingArguments`` (and a few from
#: PEFT and axolotl) -> the tunelab key that means the same, value unchanged. The key hints
#: use it, and so does the LLaMA-Factory converter (:mod:`tunelab.config_llamafactory`).
KEY_ALIASES: dict[str, str] = {
    "model_name_or_path": "model.name_or_path", "trust_remote_code": "model.trust_remote_code",
    "quantization_type": "model.quant_type", "double_quantization": "model.double_quant",
    "torch_dtype": "model.dtype", "model_revision": "model.revision",
    "finetuning_type": "method.type", "adapter_name_or_path": "method.init_from",
    "lora_rank": "method.r", "lora_r": "method.r", "lora_alpha": "method.alpha", "lora_dropout": "method.dropout",
    "lora_target": "method.target", "lora_target_modules": "method.target", "target_modules": "method.target",
    "additional_target": "method.modules_to_save", "use_dora": "method.use_dora", "use_rslora": "method.use_rslora",
    "loraplus_lr_ratio": "method.loraplus_lr_ratio", "freeze_trainable_layers": "method.trainable_layers",
    "freeze_extra_modules": "method.trainable_modules",
    "dataset": "data.train", "eval_dataset": "data.eval", "dataset_dir": "data.dataset_dir",
    "cutoff_len": "data.max_length", "max_seq_length": "data.max_length", "sequence_len": "data.max_length",
    "max_samples": "data.max_samples", "val_size": "data.eval_split", "default_system": "data.system",
    "train_on_prompt": "data.train_on_prompt", "mask_history": "data.mask_history",
    "interleave_probs": "data.weights",
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "max_steps": "train.max_steps", "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler", "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps", "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm", "optim": "train.optimizer", "adam_epsilon": "train.adam_eps",
    "seed": "train.seed", "logging_steps": "train.log_every", "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last", "eval_steps": "train.eval_every",
    "gradient_checkpointing": "train.gradient_checkpointing", "auto_find_batch_size": "train.auto_batch_size",
    "pref_beta": "pref.beta", "pref_loss": "pref.loss", "pref_ftx": "pref.ftx",
    "dpo_label_smoothing": "pref.label_smoothing", "simpo_gamma": "pref.simpo_gamma",
    "kto_chosen_weight": "pref.desirable_weight", "kto_rejected_weight": "pref.undesirable_weight",
    "ppo_epochs": "ppo.ppo_epochs", "ppo_whiten_rewards": "ppo.whiten_rewards", "reward_model": "ppo.reward_model",
    "stage": "stage", "output_dir": "output_dir",
}

#: Foreign names whose value changes form in tunelab: what to write instead.
ALIAS_HINTS: dict[str, str] = {
    "bf16": "'train.precision: bf16'", "fp16": "'train.precision: fp16'", "pure_bf16": "'model.dtype: bfloat16'",
    "quantization_bit": "'model.quantization: 4bit' (or 8bit)", "flash_attn": "'model.attn_implementation'",
    "pissa_init": "'method.init: pissa' (or method.type: pissa)", "adam_beta1": "'train.adam_betas: [beta1, beta2]'",
    "adam_beta2": "'train.adam_betas: [beta1, beta2]'",
    "disable_gradient_checkpointing": "'train.gradient_checkpointing: false'",
    "packing": "'data.packing'", "neat_packing": "'data.packing: true'",
    "overwrite_output_dir": "`tunelab train --overwrite`", "resume_from_checkpoint": "`tunelab train --resume`",
}


def _alias_hint(leaf: str) -> str | None:
    if leaf in KEY_ALIASES:
        return f"'{KEY_ALIASES[leaf]}'"
    return ALIAS_HINTS.get(leaf)


def _method_type_of(tree: Mapping[str, Any]) -> str:
    """``method.type`` of a raw config tree (the default when unset)."""
    section = tree.get("method")
    if isinstance(section, MethodConfig):
        return section.type
    return section.get("type", DEFAULT_METHOD) if isinstance(section, Mapping) else DEFAULT_METHOD


def valid_keys(method_type: str | None = None) -> list[str]:
    """Every dotted key; the method keys of ``method_type``, or of every type when None."""
    method_classes = [method_config_class(method_type)] if method_type else list(method_config_classes().values())
    keys: list[str] = []
    for name, field in RunConfig.model_fields.items():
        if name == "method":
            fields = dict.fromkeys(key for cls in method_classes for key in cls.model_fields)
            keys.extend(f"method.{key}" for key in fields)
        elif _section_class(field.annotation):
            keys.extend(f"{name}.{key}" for key in field.annotation.model_fields)
        else:
            keys.append(name)
    return keys


def _section_class(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# ---------------------------------------------------------------------------- key documentation

@dataclass(frozen=True)
class KeyDoc:
    """One key as ``tunelab config-keys`` prints it."""

    key: str
    type: str
    default: str
    help: str


@dataclass(frozen=True)
class KeyGroup:
    title: str
    keys: list[KeyDoc]


def type_text(annotation: Any, compact: bool = False) -> str:
    """A field's type in words: ``int``, ``str or null``, ``one of 'a', 'b'`` (compact: ``a|b``)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:  # a constrained member of a union (train.lr: a positive float, or auto)
        return type_text(args[0], compact)
    if origin is Literal:
        return "|".join(str(a) for a in args) if compact else "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [type_text(a, compact=True) if get_origin(a) is Literal else type_text(a) for a in args]
        return " or ".join("null" if part == "NoneType" else part for part in parts)
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation)


def _default_text(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _docs(cls: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[KeyDoc]:
    return [KeyDoc(f"{prefix}{name}", type_text(field.annotation, compact=True), _default_text(field),
                   field.description or "") for name, field in cls.model_fields.items() if name not in skip]


def _method_groups(method_type: str | None) -> list[KeyGroup]:
    """The common method keys, then each config class's own keys with the types that use it."""
    classes = method_config_classes()
    if method_type is not None:
        classes = {name: cls for name, cls in classes.items() if cls is method_config_class(method_type)}
    common = _docs(MethodConfig, "method.")
    common[0] = KeyDoc(common[0].key, "|".join(method_config_classes()), common[0].default, common[0].help)
    groups = [KeyGroup("method: every type", common)]
    by_class: dict[type[MethodConfig], list[str]] = {}
    for name, cls in classes.items():
        by_class.setdefault(cls, []).append(name)
    for cls, names in by_class.items():
        own = _docs(cls, "method.", skip=tuple(MethodConfig.model_fields))
        if own:
            groups.append(KeyGroup(f"method: type {', '.join(names)}", own))
    return groups


def describe_keys(method_type: str | None = None, stage: str | None = None) -> list[KeyGroup]:
    """Every key with its type, default and help, grouped by section; ``method_type`` narrows the
    method section to that type, ``stage`` leaves out sections that stage does not read."""
    asked: dict[str, Any] = {"stage": stage, "method": {"type": method_type} if method_type else None}
    # names checked; a fixed lr so a method without a measured `auto` rate can still be listed
    build_config({**{key: value for key, value in asked.items() if value}, "train": {"lr": 1.0}},
                 source="config-keys")
    sections = ("method", *(name for name, f in RunConfig.model_fields.items() if _section_class(f.annotation)))
    groups = [KeyGroup("run", _docs(RunConfig, "", skip=sections))]
    for name, field in RunConfig.model_fields.items():
        if name == "method":
            groups.extend(_method_groups(method_type))
        elif _section_class(field.annotation):
            section: type[Section] = field.annotation
            if stage is None or not section.stages or stage in section.stages:
                title = (section.__doc__ or name).strip().splitlines()[0]
                groups.append(KeyGroup(f"{name}: {title}", _docs(section, f"{name}.")))
    return groups


# ---------------------------------------------------------------------------- errors

def _field_at(loc: tuple[str | int, ...], method_cls: type[MethodConfig]) -> tuple[str, Any]:
    """The key a validation error is about and its field (None where ``loc`` names no field).

    Pydantic appends the member it tried to a union's location (``data.packing.bool``,
    ``data.packing.literal['auto']``): words after a field that is not a section are such
    tags and are left out; list positions are kept (``data.train.0``)."""
    section: Any = RunConfig
    field, parts = None, []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
            continue
        if not _section_class(section) or part not in section.model_fields:
            if field is None or _section_class(section):
                parts.append(part)  # not a field: say the key as written
            continue
        field = section.model_fields[part]
        parts.append(part)
        section = method_cls if section is RunConfig and part == "method" else field.annotation
    return ".".join(parts), field


def _suggest_key(key: str, siblings: list[str]) -> str:
    """' Did you mean ...?' for an unknown key: a LLaMA-Factory/HF name, a close spelling among
    ``siblings`` (the keys of its section), the same name in another section, or a close key."""
    section, _, leaf = key.rpartition(".")
    alias = _alias_hint(leaf)
    if alias:
        foreign = "" if alias.strip("'").rpartition(".")[2] == leaf else \
            f" ('{leaf}' is the LLaMA-Factory / Hugging Face name.)"
        return f" Did you mean {alias}?{foreign}"
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.75)
    if close:
        return f" Did you mean '{section}.{close[0]}'?" if section else f" Did you mean '{close[0]}'?"
    every = valid_keys()
    elsewhere = [k for k in every if k.rpartition(".")[2] == leaf]
    close = elsewhere or difflib.get_close_matches(key, every, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _unknown_key(loc: tuple[str, ...], method_type: str) -> str:
    key = ".".join(loc)
    if loc[0] != "method" or len(loc) != 2:
        section = loc[0] if len(loc) == 2 else None
        siblings = list(RunConfig.model_fields[section].annotation.model_fields) if section else \
            list(RunConfig.model_fields)
        return f"unknown key '{key}'.{_suggest_key(key, siblings)}"
    own = list(method_config_class(method_type).model_fields)
    takes = f" Method type '{method_type}' takes: {', '.join(own)}."
    owners = [name for name, cls in method_config_classes().items() if loc[1] in cls.model_fields]
    if owners:
        return f"key '{key}' does not apply to method.type '{method_type}' (it is a key of {', '.join(owners)}).{takes}"
    return f"unknown key '{key}' for method.type '{method_type}'.{_suggest_key(key, own)}{takes}"


def _format_validation_error(err: ValidationError, source: str, tree: Mapping[str, Any]) -> ConfigError:
    method_type = _method_type_of(tree)
    method_cls = method_config_classes().get(method_type, MethodConfig)
    problems: list[str] = []
    invalid: dict[str, tuple[Any, list[dict[str, Any]]]] = {}  # key -> its field, its errors (a union: one each)
    for item in err.errors():
        if item["type"] == "extra_forbidden":
            problems.append(_unknown_key(tuple(str(p) for p in item["loc"] if not isinstance(p, int)), method_type))
        elif item["type"] == "method_type":
            problems.append(f"key 'method.type' = {item.get('input')!r} is invalid: {item['msg']}.")
        else:
            key, field = _field_at(item["loc"], method_cls)
            invalid.setdefault(key, (field, []))[1].append(item)
    for key, (field, items) in invalid.items():
        expected = "a valid value" if field is None else type_text(field.annotation)
        why = "; or ".join(dict.fromkeys(item["msg"] for item in items))  # a union: one per member
        problems.append(f"key '{key}' = {items[0].get('input')!r} is invalid: {why} (expected {expected}).")
    return ConfigError(f"{source}: " + " ".join(problems)
                       + " Fix the YAML or the command-line override; valid keys are listed by "
                         "`tunelab config-keys`.")


# ---------------------------------------------------------------------------- loading

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
    """Set ``path`` in ``tree``. An override of ``method.type`` keeps only the method keys set so
    far that this type has: a LoRA file run with ``method.type=full`` drops its LoRA keys, and
    ``compare`` runs one job file with every method. Keys set after it are checked strictly."""
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if isinstance(child, MethodConfig):
            child = node[part] = child.model_dump(exclude_unset=True)
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is a value, not a section.")
        node = child
    if path == ["method", "type"] and value in method_config_classes():
        tree["method"] = keep_applicable(node, value)
    else:
        node[path[-1]] = value


def build_config(tree: Mapping[str, Any], overrides: list[str] | None = None, source: str = "config") -> RunConfig:
    """Validate a raw dict (plus ``key=value`` overrides) into a :class:`RunConfig`."""
    tree = copy.deepcopy(dict(tree or {}))  # overrides must not write into the caller's nested dicts
    for text in overrides or []:
        path, value = parse_override(text)
        _apply_override(tree, path, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise _format_validation_error(err, source, tree) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, or a ConfigError naming the file (and line) and the fix."""
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
    return tree


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or start from defaults when ``path`` is None) and apply overrides."""
    if path is None:
        return build_config({}, overrides, "command line")
    return build_config(read_yaml(path), overrides, str(path))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


def load_saved_config(path: str | Path) -> RunConfig:
    """A config written by :func:`save_config`, also by a tunelab from before per-type method
    configs, whose method section held every key of every type: those that do not apply to
    the run's type had no effect on it and are dropped."""
    tree = read_yaml(path)
    section = tree.get("method")
    if isinstance(section, dict) and section.get("type", DEFAULT_METHOD) in method_config_classes():
        tree["method"] = keep_applicable(section, section.get("type", DEFAULT_METHOD))
    return build_config(tree, source=str(path))

