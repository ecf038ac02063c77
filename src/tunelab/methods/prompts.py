"""Prompt learning through PEFT: prefix-tuning, prompt tuning, P-tuning, P-tuning v2.

These methods learn *virtual tokens*, not changes to the base weights:

- ``prompt``     (Lester et al., 2021) trainable input embeddings prepended to every
  sequence; random, or initialised from the embeddings of ``prompt_init_text``;
- ``ptuning``    (Liu et al., 2021, "GPT understands, too") input embeddings produced by a
  small MLP or LSTM prompt encoder (``encoder_type``);
- ``prefix``     (Li & Liang, 2021) trainable key/value prefixes in every attention layer,
  optionally reparameterised through an MLP (``prefix_projection``, ``encoder_hidden_size``);
- ``ptuning_v2`` (Liu et al., 2022) "deep prompt tuning": the same per-layer key/value
  prefixes, trained directly. In PEFT terms that is prefix-tuning *without*
  reparameterisation, so it maps onto ``PrefixTuningConfig(prefix_projection=False)``.

Two PEFT limits shape :meth:`PromptMethod.write_adapter`: PEFT cannot reload a
prompt-learning adapter as trainable, and for P-tuning and projected prefixes it saves only
the encoder's *output* (the final virtual embeddings), not the encoder itself. The PEFT
directory therefore gets one extra file, ``tunelab_trainable.safetensors``, with every
trainable tensor of the prompt encoder, from which ``init_from`` continues exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

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

#: Keys two prompt configs share without sharing a parent: declared once, used by both.
PromptInitText = Annotated[str | None, Field(
    description="Start the virtual tokens at this text: its embeddings (prompt) or the base's key/values of it "
                "(prefix, ptuning_v2, mam without prefix_projection).")]
EncoderHiddenSize = Annotated[int | None, Field(
    description="Hidden size of the prompt encoder (MLP/LSTM); default: the model's hidden size.")]


class VirtualTokensConfig(MethodConfig):
    """Prompt learning: how many virtual tokens are learned."""

    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens prepended to every sequence.")


class PromptConfig(VirtualTokensConfig):
    """Prompt tuning."""

    prompt_init_text: PromptInitText = None


class PrefixConfig(VirtualTokensConfig):
    """Prefix-tuning and P-tuning v2 (per-layer key/value prefixes)."""

    prefix_projection: bool = Field(False, description="Produce the prefix through an MLP (prefix-tuning's "
                                                       "reparameterisation).")
    encoder_hidden_size: EncoderHiddenSize = None
    prompt_init_text: PromptInitText = None


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
        raise ConfigError(f"method.prompt_init_text {text!r} tokenizes to nothing; give a non-empty text.")
    return (ids * math.ceil(count / len(ids)))[:count]


def init_prefix_from_text(model: "PeftModel", tokenizer: "PreTrainedTokenizerBase", cfg: PrefixConfig) -> None:
    """Start a fresh key/value prefix (prefix, ptuning_v2, MAM) at the base's own key/values of
    ``method.prompt_init_text``; without that text PEFT's random table stays.

    Why: a random table of per-layer keys and values pulls every attention head towards
    noise, so training starts far above the base model's loss (measured on SmolLM2 in the
    compare job: ptuning_v2 7.3 and MAM 5.8 after 8 steps against the base's 3.7). Li & Liang
    (2021) initialise prefixes from activations of real words instead. PEFT places the prefix
    at positions 0..n-1 and the input after it, so with this table the fresh model computes
    exactly what the base computes with the text written before every input.
    """
    text = cfg.prompt_init_text
    if not text:
        return
    if cfg.prefix_projection:
        raise ConfigError("method.prompt_init_text initialises the key/value prefix itself, but with "
                          "method.prefix_projection: true the prefix is the output of an MLP that starts random. "
                          "Drop one of the two (prefix_projection: false trains the table directly).")
    base = model.get_base_model()
    ids = torch.tensor([_virtual_token_ids(tokenizer, text, cfg.num_virtual_tokens)],
                       device=base.get_input_embeddings().weight.device)
    was_training = base.training
    base.eval()  # dropout would make the initial prefix random again
    try:
        with torch.no_grad():
            cache = base(input_ids=ids, use_cache=True).past_key_values
    finally:
        base.train(was_training)
    # PEFT reads row t of the table as [layer, key|value, kv head, head dim], flattened.
    per_layer = torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])
    table = per_layer.permute(3, 0, 1, 2, 4).reshape(cfg.num_virtual_tokens, -1)
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    with torch.no_grad():
        weight.copy_(table.to(weight.dtype))


def _encoder_hidden_size(method: PeftMethod, model: "PreTrainedModel") -> int:
    """``encoder_hidden_size``, defaulting to the model's hidden size."""
    return method.cfg.encoder_hidden_size or model.config.hidden_size


@register("prefix")
class Prefix(PromptMethod):
    """Prefix-tuning: trained key/value prefixes in every layer, optionally through an MLP."""

    config_class = PrefixConfig
    cfg: PrefixConfig
    peft_type = "PREFIX_TUNING"
    #: PEFT passes prefixes as past_key_values, which gradient checkpointing does not support.
    supports_gradient_checkpointing = False

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                  prefix_projection=self.cfg.prefix_projection,
                                  encoder_hidden_size=_encoder_hidden_size(self, model))

    def after_create(self, model: "PeftModel", base: "PreTrainedModel",
                     tokenizer: "PreTrainedTokenizerBase") -> None:
        init_prefix_from_text(model, tokenizer, self.cfg)


@register("ptuning_v2")
class PTuningV2(Prefix):
    """P-tuning v2: deep prompts at every layer = prefix-tuning without reparameterisation."""

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        if self.cfg.prefix_projection:
            raise ConfigError("method.type 'ptuning_v2' trains the per-layer prompts directly; "
                              "method.prefix_projection: true is the reparameterised variant, which is "
                              "method.type: prefix. Use that, or drop prefix_projection.")
        return super().peft_config(model, tokenizer)


@register("prompt")
class PromptTuning(PromptMethod):
    """Prompt tuning: trained input embeddings, random or from ``prompt_init_text``."""

    config_class = PromptConfig
    cfg: PromptConfig
    peft_type = "PROMPT_TUNING"

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                  prompt_tuning_init="RANDOM")

    def after_create(self, model: "PeftModel", base: "PreTrainedModel",
                     tokenizer: "PreTrainedTokenizerBase") -> None:
        """Text initialisation from the tokenizer object we already have.

        PEFT's own TEXT init re-loads a tokenizer from a path, which an in-memory or GGUF
        tokenizer does not have; the idea (Lester et al.) is simply to start the virtual
        tokens at the embeddings of a task description, repeated to fill them all.
        """
        text = self.cfg.prompt_init_text
        if not text:
            return
        ids = _virtual_token_ids(tokenizer, text, self.cfg.num_virtual_tokens)
        embeddings = base.get_input_embeddings()
        encoder = model.prompt_encoder[ADAPTER_NAME].embedding
        with torch.no_grad():
            vectors = embeddings(torch.tensor(ids, device=embeddings.weight.device))
            encoder.weight.copy_(vectors.to(encoder.weight.dtype))


@register("ptuning")
class PTuning(PromptMethod):
    """P-tuning: virtual input embeddings produced by an MLP or LSTM prompt encoder."""

    config_class = PTuningConfig
    cfg: PTuningConfig
    peft_type = "P_TUNING"

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                   encoder_reparameterization_type=self.cfg.encoder_type.upper(),
                                   encoder_hidden_size=_encoder_hidden_size(self, model))
