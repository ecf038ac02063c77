"""Prompt learning through PEFT: prefix-tuning, prompt tuning, P-tuning, P-tuning v2.

These methods learn *virtual tokens*, not changes to the base weights:

- ``prompt``     (Lester et al., 2021) trainable input embeddings prepended to every
  sequence;
- ``ptuning``    (Liu et al., 2021, "GPT understands, too") input embeddings produced by a
  small MLP or LSTM prompt encoder (``encoder_type``);
- ``prefix``     (Li & Liang, 2021) trainable key/value prefixes in every attention layer,
  reparameterised through an MLP as in the paper (``prefix_projection``, on by default;
  ``encoder_hidden_size``);
- ``ptuning_v2`` (Liu et al., 2022) "deep prompt tuning": the same per-layer key/value
  prefixes, trained directly. In PEFT terms that is prefix-tuning *without*
  reparameterisation, so it maps onto ``PrefixTuningConfig(prefix_projection=False)``.

Every one of them starts at the base model's own representation of a text,
``prompt_init_text`` (default :data:`NEUTRAL_INIT_TEXT`): the text's token embeddings
(prompt, P-tuning) or the base's keys and values of it in every layer (prefix, P-tuning v2,
MAM). A fresh model then computes exactly what the base computes with that text written
before every input, which for a neutral text is close to the base itself; PEFT's random
virtual tokens instead start far above the base's loss and short runs end there (see
:func:`start_virtual_tokens`). ``prompt_init_text: null`` keeps PEFT's random start.

Two PEFT limits shape :meth:`PromptMethod.write_adapter`: PEFT cannot reload a
prompt-learning adapter as trainable, and for P-tuning and projected prefixes it saves only
the encoder's *output* (the final virtual embeddings), not the encoder itself. The PEFT
directory therefore gets one extra file, ``tunelab_trainable.safetensors``, with every
trainable tensor of the prompt encoder, from which ``init_from`` continues exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import ConfigError
from tunelab.methods.base import register, trainable_state
from tunelab.methods.peft_common import ADAPTER_NAME, PeftMethod

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Full trainable state of the prompt encoder, next to PEFT's own files.
TRAINABLE_FILE = "tunelab_trainable.safetensors"

#: The text virtual tokens start from unless ``prompt_init_text`` says otherwise: a plain,
#: content-free preamble, so it suits any tokenizer and asks nothing of the model. Measured on
#: SmolLM2-135M-Instruct (``python benchmarks/neutral_text.py``): written before 32 identity and
#: general questions it moves the base's answer-token distribution by KL 0.09 nats/token (top-1
#: token unchanged at 84%); other plain sentences measured 0.08-0.11, while repeated special
#: tokens or whitespace (what "neutral" might suggest: end-of-text, <|im_start|>, a newline)
#: moved it 0.36-0.69.
NEUTRAL_INIT_TEXT = "The following is a conversation.\n"

#: Keys several prompt configs share without sharing a parent: declared once, used by each.
PromptInitText = Annotated[str | None, Field(
    description="Start the virtual tokens at the base's own states for this text: its embeddings (prompt, ptuning) "
                "or the base's keys/values of it (prefix, ptuning_v2, mam); null = PEFT's random start.")]
EncoderHiddenSize = Annotated[int | None, Field(
    description="Hidden size of the prompt encoder (MLP/LSTM); default: the model's hidden size.")]


class VirtualTokensConfig(MethodConfig):
    """Prompt learning: how many virtual tokens are learned, and the text they start from."""

    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens prepended to every sequence.")
    prompt_init_text: PromptInitText = NEUTRAL_INIT_TEXT


class PromptConfig(VirtualTokensConfig):
    """Prompt tuning."""


class KeyValuePrefixConfig(VirtualTokensConfig):
    """P-tuning v2: per-layer key/value prefixes, trained directly."""


class PrefixConfig(KeyValuePrefixConfig):
    """Prefix-tuning: per-layer key/value prefixes produced by an MLP (or trained directly)."""

    prefix_projection: bool = Field(True, description="Produce the prefix through an MLP (prefix-tuning's "
                                                      "reparameterisation); false = train the table directly.")
    encoder_hidden_size: EncoderHiddenSize = None


class PTuningConfig(VirtualTokensConfig):
    """P-tuning's prompt encoder."""

    encoder_type: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder network: mlp or lstm.")
    encoder_hidden_size: EncoderHiddenSize = None


class PromptMethod(PeftMethod):
    """Shared persistence of the prompt-learning methods."""

    mergeable = False
    #: PEFT prepends the virtual tokens once per row and ignores position ids, so several
    #: examples packed into one row would share one prompt and see wrong positions.
    supports_packing = False
    merge_refusal = ("its learned virtual tokens are extra inputs (embeddings or attention key/value prefixes) "
                     "fed to the model on every call, not changes to the base model's weights, so there is "
                     "nothing to fold into them.")

    def write_adapter(self, model: nn.Module, directory: Path) -> None:
        """PEFT's directory plus the encoder's full trainable state (what PEFT leaves out)."""
        from safetensors.torch import save_file

        super().write_adapter(model, directory)
        save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, str(directory / TRAINABLE_FILE))

    def load_trainable(self, base: "PreTrainedModel", path: Path) -> nn.Module:
        """Rebuild a trainable adapter from the saved config and restore every encoder tensor."""
        from peft import PeftConfig, get_peft_model
        from safetensors.torch import load_file

        state_file = path / TRAINABLE_FILE
        if not state_file.is_file():
            raise ConfigError(f"{state_file} is missing: the prompt adapter in {path} was not saved by tunelab "
                              "(PEFT alone keeps only the final virtual embeddings), so training cannot continue "
                              "from it. Train a new adapter instead of using method.init_from.")
        config = PeftConfig.from_pretrained(str(path))
        config.inference_mode = False
        model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
        _restore_trainable(model, load_file(str(state_file)), state_file)
        return model


def _restore_trainable(model: nn.Module, saved: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``saved`` into the trainable parameters; names and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(saved):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ConfigError(f"{source} does not fit the adapter described by its adapter_config.json "
                          f"(missing: {missing[:3]}, unexpected: {extra[:3]}). The directory was edited or mixed "
                          "from different runs; point method.init_from at an intact run directory.")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != saved[name].shape:
                raise ConfigError(f"{source}: tensor '{name}' has shape {tuple(saved[name].shape)} but the adapter "
                                  f"expects {tuple(param.shape)}; point method.init_from at an intact run directory.")
            param.copy_(saved[name])


def _virtual_token_ids(tokenizer: "PreTrainedTokenizerBase", text: str, count: int) -> list[int]:
    """The token ids of ``text``, repeated and cut to exactly ``count`` virtual tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"method.prompt_init_text {text!r} tokenizes to nothing; give a non-empty text "
                          "(or null for a random start).")
    return (ids * math.ceil(count / len(ids)))[:count]


def _key_value_table(base: "PreTrainedModel", ids: list[int]) -> torch.Tensor:
    """The base's keys and values of ``ids`` in every layer, as PEFT's prefix table [tokens, L*2*H_kv]."""
    tokens = torch.tensor([ids], device=base.get_input_embeddings().weight.device)
    was_training = base.training
    base.eval()  # dropout would make the initial prefix random again
    try:
        with torch.no_grad():
            cache = base(input_ids=tokens, use_cache=True).past_key_values
    finally:
        base.train(was_training)
    # PEFT reads row t of the table as [layer, key|value, kv head, head dim], flattened.
    per_layer = torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])
    return per_layer.permute(3, 0, 1, 2, 4).reshape(len(ids), -1)


def start_virtual_tokens(model: "PeftModel", tokenizer: "PreTrainedTokenizerBase", cfg: VirtualTokensConfig) -> None:
    """Start a fresh prompt encoder at the base's own states for ``cfg.prompt_init_text``.

    Why: random virtual tokens are noise in front of every input. A random key/value prefix
    pulls every attention head towards it, so training starts far above the base's loss
    (SmolLM2, compare job, 8 steps: ptuning_v2 7.3 and MAM 5.8 against the base's 3.7), and
    short runs end above it. Li & Liang (2021) and Lester et al. (2021) initialise from real
    words instead. The target is what the base itself makes of the text: its token embeddings
    for input-side methods (prompt, P-tuning), its keys and values in every layer for prefix
    methods (prefix, P-tuning v2, MAM). PEFT places the virtual tokens at positions 0..n-1
    and the input after them, so the fresh model computes exactly what the base computes with
    the text written before every input. Encoders with an MLP or LSTM (prefix's
    reparameterisation, P-tuning) get there through their output layer
    (:func:`_fit_output_layer`); tables are copied. Null text: PEFT's random start stays.
    """
    text = cfg.prompt_init_text
    if text is None:
        return
    base = model.get_base_model()
    ids = _virtual_token_ids(tokenizer, text, cfg.num_virtual_tokens)
    if getattr(model.active_peft_config.peft_type, "value", None) == "PREFIX_TUNING":
        target = _key_value_table(base, ids)
    else:
        embeddings = base.get_input_embeddings()
        with torch.no_grad():
            target = embeddings(torch.tensor(ids, device=embeddings.weight.device))
    encoder = model.prompt_encoder[model.active_adapter]
    output_layer = next((m for m in reversed(list(encoder.modules())) if isinstance(m, nn.Linear)), None)
    with torch.no_grad():
        if output_layer is None:
            encoder.embedding.weight.copy_(target.to(encoder.embedding.weight.dtype))
        else:
            _fit_output_layer(encoder, output_layer, target)


def _fit_output_layer(encoder: nn.Module, output_layer: nn.Linear, target: torch.Tensor) -> None:
    """Set ``output_layer`` so that ``encoder(0..n-1)`` is ``target`` [n, out].

    The layer's input for the n virtual tokens is a fixed matrix H [n, in] (the encoder's
    random embedding through its first layers). Bias = the mean target row, weight = the
    minimum-norm solution of H W^T = target - bias (pseudo-inverse): exact while n <= in,
    the least-squares fit beyond. The rest of the encoder keeps its random initialisation,
    so training still goes through the reparameterisation the method is defined by.
    """
    captured: list[torch.Tensor] = []
    hook = output_layer.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        encoder(torch.arange(target.shape[0], device=output_layer.weight.device))
    finally:
        hook.remove()
    features = captured[0].reshape(-1, output_layer.in_features).double()
    goal = target.reshape(features.shape[0], -1).double().to(features.device)
    bias = goal.mean(0)
    weight = (torch.linalg.pinv(features) @ (goal - bias)).T
    output_layer.weight.copy_(weight.to(output_layer.weight.dtype))
    output_layer.bias.copy_(bias.to(output_layer.bias.dtype))


def _encoder_hidden_size(method: PeftMethod, model: "PreTrainedModel") -> int:
    """``encoder_hidden_size``, defaulting to the model's hidden size."""
    return method.cfg.encoder_hidden_size or model.config.hidden_size


class VirtualTokenMethod(PromptMethod):
    """A prompt-learning method whose fresh virtual tokens start at ``prompt_init_text``."""

    cfg: VirtualTokensConfig

    def after_create(self, model: "PeftModel", base: "PreTrainedModel",
                     tokenizer: "PreTrainedTokenizerBase") -> None:
        start_virtual_tokens(model, tokenizer, self.cfg)


@register("ptuning_v2")
class KeyValuePrefix(VirtualTokenMethod):
    """P-tuning v2: deep prompts at every layer = prefix-tuning without reparameterisation."""

    config_class: type[VirtualTokensConfig] = KeyValuePrefixConfig
    peft_type = "PREFIX_TUNING"
    #: PEFT passes prefixes as past_key_values, which gradient checkpointing does not support.
    supports_gradient_checkpointing = False

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                  **self.projection(model))

    def projection(self, model: "PreTrainedModel") -> dict[str, Any]:
        """PEFT's reparameterisation settings: none for the table."""
        return {"prefix_projection": False}


@register("prefix")
class Prefix(KeyValuePrefix):
    """Prefix-tuning (Li & Liang, 2021): key/value prefixes in every layer produced by an MLP.

    The MLP (``prefix_projection``, the paper's reparameterisation) is what sets the method
    apart from ``ptuning_v2``: Li & Liang found that optimising the prefix table directly is
    unstable and trains worse, and it trains better here too (README "Methods").
    """

    config_class = PrefixConfig
    cfg: PrefixConfig

    def projection(self, model: "PreTrainedModel") -> dict[str, Any]:
        return {"prefix_projection": self.cfg.prefix_projection,
                "encoder_hidden_size": _encoder_hidden_size(self, model)}


@register("prompt")
class PromptTuning(VirtualTokenMethod):
    """Prompt tuning: trained input embeddings, from ``prompt_init_text`` or random.

    PEFT's own TEXT init re-loads a tokenizer from a path, which an in-memory or GGUF
    tokenizer does not have, so the table starts random here and is then set from the
    tokenizer object we already have (:func:`start_virtual_tokens`).
    """

    config_class = PromptConfig
    cfg: PromptConfig
    peft_type = "PROMPT_TUNING"

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                  prompt_tuning_init="RANDOM")


@register("ptuning")
class PTuning(VirtualTokenMethod):
    """P-tuning: virtual input embeddings produced by an MLP or LSTM prompt encoder."""

    config_class = PTuningConfig
    cfg: PTuningConfig
    peft_type = "P_TUNING"

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                   encoder_reparameterization_type=self.cfg.encoder_type.upper(),
                                   encoder_hidden_size=_encoder_hidden_size(self, model))
