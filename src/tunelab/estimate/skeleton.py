"""The run's model as shapes only: built on the ``meta`` device, with the method applied.

Why meta: the estimator must answer "will this fit?" before anything is loaded. A meta
model has every parameter's shape and dtype but no storage, so building SmolLM2 (or a
70B model) costs milliseconds and no memory. The method is applied with tunelab's own
registry, so the trainable-parameter count is exactly what ``tunelab train`` will train
(PEFT's LoRA, IA3 and prompt-learning wrappers, freeze's layer choice and the native
bottleneck adapters all work on meta tensors). Methods that need real weights to be
created (QLoRA needs a 4-bit base) are counted with the plain-LoRA method of the same
configuration, which creates the same adapter matrices.

What the memory model needs from the skeleton is collected into :class:`ModelFacts`:
parameter bytes by storage kind, the trainable parameters, and per decoder layer which
linear layers save their inputs for backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.methods.base import Method, get_method
from tunelab.methods.freeze import decoder_layers
from tunelab.models.loader import model_directory, rope_scaled_config

#: Bytes per weight of bitsandbytes storage (data only; block statistics are added below).
NF4_DATA_BYTES = 0.5
INT8_DATA_BYTES = 1.0
#: NF4 keeps one absmax per block of 64 weights: fp32 (4 bytes), or with double quantisation
#: an 8-bit absmax plus one fp32 scale per 256 blocks (Dettmers et al. 2023, sec. 3).
NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256


@dataclass(frozen=True)
class SavedInput:
    """A linear layer of a decoder layer whose input is kept for backward."""

    group: str       # the decoder-layer child it belongs to ("self_attn", "mlp", adapter unit...)
    features: int    # in_features of the layer = elements saved per token


@dataclass
class ModelFacts:
    """Everything the memory formula reads from the model (no storage anywhere)."""

    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    layers: int
    vocab: int
    weight_bytes: dict[str, int]            # storage kind ("float32", "nf4", ...) -> bytes
    layer_weight_bytes: int                 # stored bytes of the largest decoder layer
    frozen_linear_weights: list[int]        # per decoder layer: weights of frozen linear layers
    trainable_linear_weights: int           # elements of trainable nn.Linear weights (autocast cache)
    trainable_params: int
    trainable_bytes: int
    trainable_tensors: list[int]            # element count of each trainable tensor (8-bit optimizers)
    total_params: int
    first_grad_layer: int                   # lowest decoder layer that gradients reach (layers = none)
    saved_inputs: list[list[SavedInput]]    # per decoder layer
    trainable_norms: list[int]              # per decoder layer: trainable norm weights
    ia3_outputs: list[int]                  # per decoder layer: IA3-scaled output features (k, v)
    ia3_inputs: list[int]                   # per decoder layer: IA3-scaled input features (FFN)
    dora_outputs: list[int]                 # per decoder layer: output features of DoRA-adapted layers
    quantized_float_bytes: int = 0          # the quantized weights' bytes in the dtype they are loaded in
    #: whether the trainable linears of one decoder-layer child (q/k/v, gate/up) keep one shared
    #: input for backward; PEFT's LoRA layers on a quantized base each cast theirs
    shared_linear_inputs: bool = True
    virtual_tokens: int = 0                 # prompt tuning / P-tuning: tokens prepended to every row
    prefix_tokens: int = 0                  # prefix / P-tuning v2: key/value prefix length
    method_note: str = ""


def model_config(cfg: RunConfig) -> Any:
    """The transformers config of ``cfg.model`` (its revision, its RoPE scaling) without loading weights."""
    return rope_scaled_config(cfg.model, model_directory(cfg.model))


def build_meta_model(config: Any, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """A frozen model of ``config`` whose parameters live on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.requires_grad_(False)
    return model


def apply_method(method: Method, model: nn.Module, tokenizer: Any) -> tuple[nn.Module, str]:
    """``method.apply`` on the meta model; LoRA variants that need real weights fall back to plain LoRA."""
    from tunelab.methods.lora import Lora, PlainLora

    try:
        with torch.device("meta"):
            return method.apply(model, tokenizer), ""
    except ConfigError as err:
        if not isinstance(method, Lora):
            raise
        proxy = PlainLora(method.cfg)
        with torch.device("meta"):
            wrapped = proxy.apply(model, tokenizer)
        return wrapped, (f"method '{method.cfg.type}' cannot be built without weights ({str(err)[:80]}...); "
                         "its adapter was counted as plain LoRA with the same r and targets.")


def _linear_leaves(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in layer.named_modules() if isinstance(module, nn.Linear)]


def _saved_inputs(layer: nn.Module) -> list[SavedInput]:
    """Linear layers whose weight trains (full, freeze, LoRA A/B, adapters): they keep their input."""
    saved = []
    for name, module in _linear_leaves(layer):
        if module.weight.requires_grad:
            saved.append(SavedInput(group=name.split(".")[0], features=module.in_features))
    return saved


def _frozen_linear_weights(layer: nn.Module) -> int:
    """Elements of frozen linear weights (under CPU autocast their bf16 copies are kept for backward)."""
    return sum(m.weight.numel() for _, m in _linear_leaves(layer) if not m.weight.requires_grad)


def _ia3_scaled(layer: nn.Module) -> tuple[int, int]:
    """(output features scaled by IA3 vectors, input features scaled by IA3 vectors) in a layer."""
    outputs = inputs = 0
    for module in layer.modules():
        vectors = getattr(module, "ia3_l", None)
        if not isinstance(vectors, nn.ParameterDict) or not len(vectors):
            continue
        base = module.get_base_layer()
        if getattr(module, "is_feedforward", False):
            inputs += base.in_features
        else:
            outputs += base.out_features
    return outputs, inputs


def _dora_outputs(layer: nn.Module) -> int:
    """Output features of DoRA-adapted layers: DoRA rescales both the base and the LoRA output
    by the trained magnitude, and each product keeps its operand for backward."""
    return sum(module.get_base_layer().out_features for module in layer.modules()
               if any(getattr(module, "use_dora", {}).values()))


def _trainable_linear_weights(model: nn.Module) -> int:
    """Elements of trainable linear weights, each once (a tied LM head is the embedding)."""
    weights = {id(m.weight): m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and m.weight.requires_grad}
    return sum(weights.values())


def _trainable_norms(layer: nn.Module) -> int:
    """Trainable 1-D weights outside linear layers (norms): each keeps its normalised input."""
    return sum(p.numel() for name, p in layer.named_parameters()
               if p.requires_grad and p.dim() == 1 and "norm" in name)


def _prompt_tokens(model: nn.Module) -> tuple[int, int]:
    """(virtual input tokens, key/value prefix tokens) added by PEFT prompt learning."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        return 0, 0
    config = next(iter(peft_config.values()))
    if not getattr(config, "is_prompt_learning", False):
        return 0, 0
    kind = getattr(config.peft_type, "value", config.peft_type)
    tokens = int(config.num_virtual_tokens)
    return (0, tokens) if kind == "PREFIX_TUNING" else (tokens, 0)


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each parameter once, even when tied (embeddings and LM head of SmolLM2 are one tensor)."""
    seen: set[int] = set()
    unique = []
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            unique.append(param)
    return unique


#: Name parts of modules a method adds; bitsandbytes quantizes only the base projections.
_ADAPTER_TAGS = ("lora_", "tunelab_adapters", "prompt_encoder", "ia3_")


def _quantized_ids(model: nn.Module, quantization: str) -> set[int]:
    """Parameters bitsandbytes would quantize: every base linear weight except the output head's."""
    if quantization == "none":
        return set()
    head = getattr(model, "get_output_embeddings", lambda: None)()  # None inside a decoder layer
    head_weight = id(head.weight) if head is not None else None
    return {id(module.weight) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module.weight) != head_weight
            and not any(tag in name for tag in _ADAPTER_TAGS)}


def quantized_bytes(numel: int, quantization: str, double_quant: bool, rows: int) -> int:
    """Bytes bitsandbytes stores for ``numel`` weights in ``rows`` output rows."""
    if quantization == "8bit":
        return int(numel * INT8_DATA_BYTES + rows * 4)        # int8 data + one fp32 scale per row
    blocks = numel / NF4_BLOCK
    stats = blocks * 1 + blocks / DOUBLE_QUANT_BLOCK * 4 if double_quant else blocks * 4
    return int(numel * NF4_DATA_BYTES + stats)


def weight_bytes(model: nn.Module, quantization: str, quant_type: str, double_quant: bool
                 ) -> dict[str, int]:
    """Bytes of every stored parameter, by storage kind; tied parameters count once."""
    quantized = _quantized_ids(model, quantization)
    kind_name = {"4bit": quant_type, "8bit": "int8"}.get(quantization, "")
    totals: dict[str, int] = {}
    for param in _unique_parameters(model):
        if id(param) in quantized:
            kind, size = kind_name, quantized_bytes(param.numel(), quantization, double_quant, param.shape[0])
        else:
            kind, size = str(param.dtype).replace("torch.", ""), param.numel() * param.element_size()
        totals[kind] = totals.get(kind, 0) + size
    return totals


def _first_grad_layer(model: nn.Module, layers: nn.ModuleList, prompt: bool) -> int:
    """Index of the lowest decoder layer on the gradient path (len(layers) when nothing trains).

    Gradients reach a layer when it, or anything computed before it (embeddings, virtual
    tokens, key/value prefixes that every layer reads), has trainable parameters.
    """
    if prompt or model.get_input_embeddings().weight.requires_grad:
        return 0
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    if any(p.requires_grad for name, p in model.named_parameters() if "tunelab_adapters" in name):
        return 0
    return len(layers)


def _adapter_units(model: nn.Module, count: int) -> list[list[SavedInput]]:
    """Native bottleneck adapters (kept outside the layers, run by hooks): their linear inputs per layer."""
    per_layer: list[list[SavedInput]] = [[] for _ in range(count)]
    for name, module in model.named_modules():
        if "tunelab_adapters" not in name or not isinstance(module, nn.Linear) or not module.weight.requires_grad:
            continue
        index = next((int(part) for part in name.split(".") if part.isdigit()), None)
        if index is not None and index < count:
            per_layer[index].append(SavedInput(group=f"adapter:{name.rsplit('.', 2)[0]}",
                                               features=module.in_features))
    return per_layer


def _dims(config: Any) -> dict[str, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return dict(hidden=hidden, intermediate=getattr(config, "intermediate_size", 4 * hidden),
                q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,
                layers=config.num_hidden_layers, vocab=config.vocab_size)


def model_facts(cfg: RunConfig, tokenizer: Any, base_dtype: torch.dtype, total_steps: int,
                config: Any | None = None) -> ModelFacts:
    """Build the meta skeleton of ``cfg``, apply its method and read off what the formula needs."""
    config = config if config is not None else model_config(cfg)
    model = build_meta_model(config, base_dtype, cfg.model.attn_implementation)
    quantization = cfg.model.quantization
    if cfg.method.type == "qlora" and quantization == "none":
        quantization = "4bit"  # the loader quantizes for qlora (config: "qlora sets 4bit when left at none")
    method = get_method(cfg.method)
    method.configure_schedule(total_steps)
    wrapped, note = apply_method(method, model, tokenizer)
    _, layers = decoder_layers(wrapped)
    virtual, prefix = _prompt_tokens(wrapped)
    params = _unique_parameters(wrapped)
    trainable = [p for p in params if p.requires_grad]
    adapters = _adapter_units(wrapped, len(layers))
    quantized = _quantized_ids(wrapped, quantization)
    quantized_elements = sum(p.numel() for p in params if id(p) in quantized)
    ia3 = [_ia3_scaled(layer) for layer in layers]
    return ModelFacts(
        **_dims(config),
        weight_bytes=weight_bytes(wrapped, quantization, cfg.model.quant_type, cfg.model.double_quant),
        layer_weight_bytes=max(sum(weight_bytes(layer, quantization, cfg.model.quant_type,
                                                cfg.model.double_quant).values()) for layer in layers),
        frozen_linear_weights=[_frozen_linear_weights(layer) for layer in layers],
        trainable_linear_weights=_trainable_linear_weights(wrapped),
        trainable_params=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        trainable_tensors=[p.numel() for p in trainable],
        total_params=sum(p.numel() for p in params),
        first_grad_layer=_first_grad_layer(wrapped, layers, bool(virtual or prefix)),
        saved_inputs=[_saved_inputs(layer) + extra for layer, extra in zip(layers, adapters)],
        trainable_norms=[_trainable_norms(layer) for layer in layers],
        ia3_outputs=[o for o, _ in ia3], ia3_inputs=[i for _, i in ia3],
        dora_outputs=[_dora_outputs(layer) for layer in layers],
        quantized_float_bytes=quantized_elements * base_dtype.itemsize, shared_linear_inputs=not quantized,
        virtual_tokens=virtual, prefix_tokens=prefix, method_note=note)
