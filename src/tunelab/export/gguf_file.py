"""Writing a merged model as one GGUF file for llama.cpp and Ollama (through ``gguf.GGUFWriter``).

What llama.cpp needs besides the weights, and why:

- tensor names in GGUF's scheme (``blk.N.attn_q.weight``): taken from the ``gguf`` package's
  own name map for the architecture, not spelt out here;
- the attention query and key rows of Llama models reordered: transformers rotates the two
  halves of each head (``rotate_half``), llama.cpp's Llama kernels rotate adjacent pairs, so
  per head the rows ``[x0..x(d/2-1), y0..y(d/2-1)]`` are interleaved to ``[x0, y0, x1, y1, ...]``.
  Architectures whose llama.cpp kernel rotates halves too (Qwen2) are written as they are;
- hyper-parameters under ``<arch>.*`` and the tokenizer under ``tokenizer.ggml.*`` (see
  :mod:`tunelab.export.gguf_vocab`), plus the chat template;
- 1-D tensors (norms, biases) in F32, as llama.cpp computes them; matrices in the chosen type.

Tensors are converted and written one at a time after the header, so the file never exists
twice in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tunelab.errors import ConfigError
from tunelab.export.gguf_vocab import GgufVocab

#: ``--gguf-type`` -> (gguf.GGMLQuantizationType, gguf.LlamaFileType) member names. f16, bf16 and f32
#: keep the merged floats; q8_0 stores blocks of 32 int8 values with one fp16 scale.
_TYPES = {"f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
          "f32": ("F32", "ALL_F32")}
GGUF_TYPES = tuple(_TYPES)
#: Rows of a q8_0 matrix are cut into blocks of this many values.
Q8_BLOCK = 32


@dataclass(frozen=True)
class Architecture:
    """How one transformers ``model_type`` is written."""

    gguf_name: str  # gguf.MODEL_ARCH member name
    rotate_pairs: bool  # llama.cpp rotates adjacent pairs: reorder the query/key rows of each head


ARCHITECTURES = {
    "llama": Architecture("LLAMA", rotate_pairs=True),
    "qwen2": Architecture("QWEN2", rotate_pairs=False),
}


@dataclass(frozen=True)
class _Planned:
    gguf_name: str
    hf_name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]


def write_gguf(model: Any, vocab: GgufVocab, chat_template: str, path: Path, gguf_type: str, name: str) -> list[str]:
    """Write ``model`` (a merged transformers model) to ``path``; returns notes for the user."""
    import gguf

    config = model.config
    arch = _architecture(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_name)])
    _write_hyperparameters(writer, config, head_dim, _rope_theta(config))
    _write_vocab(writer, vocab, chat_template)
    writer.add_name(name)
    state = model.state_dict()
    plan, notes = _plan(state, config, arch, gguf_type)
    writer.add_file_type(gguf.LlamaFileType[_TYPES[gguf_type][1]])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for item in plan:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(item.shape, item.qtype)
        writer.add_tensor_info(item.gguf_name, item.shape, np.dtype(np.float32), math.prod(byte_shape),
                               raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in _encoded(plan, state, arch, heads, kv_heads):
        writer.write_tensor_data(data)
    writer.close()
    return vocab.notes + notes


def _architecture(config: Any) -> Architecture:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ConfigError(f"GGUF export supports the {', '.join(ARCHITECTURES)} architectures; this model is "
                          f"'{config.model_type}'. Export with --format safetensors and convert that directory with "
                          "llama.cpp's converter.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("GGUF export of Llama models with attention or MLP biases is not supported: llama.cpp's "
                          "Llama graph has no place for them. Export with --format safetensors.")
    return arch


def _rope_theta(config: Any) -> float:
    """The rotary base; scaled rotary embeddings (Llama 3.1's, YaRN, ...) are refused, not silently dropped."""
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ConfigError(f"this model uses '{kind}' scaled rotary embeddings, which tunelab's GGUF export does not "
                          "write yet (the model would lose its long-context behaviour). Export with --format "
                          "safetensors and convert with llama.cpp's converter.")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_hyperparameters(writer: Any, config: Any, head_dim: int, rope_theta: float) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _write_vocab(writer: Any, vocab: GgufVocab, chat_template: str) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for add, value in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                       (writer.add_unk_token_id, vocab.unk_id), (writer.add_pad_token_id, vocab.pad_id),
                       (writer.add_eot_token_id, vocab.eot_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_chat_template(chat_template)


def _plan(state: dict[str, torch.Tensor], config: Any, arch: Architecture, gguf_type: str
          ) -> tuple[list[_Planned], list[str]]:
    """GGUF name and type of every tensor, in file order; the tied output head is not repeated."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_name), config.num_hidden_layers)
    wanted = gguf.GGMLQuantizationType[_TYPES[gguf_type][0]]
    plan, kept_f16 = [], []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise ConfigError(f"the model's tensor '{hf_name}' has no name in GGUF's {arch.gguf_name.lower()} scheme, "
                              "so llama.cpp could not use the file. Export with --format safetensors.")
        qtype = wanted if tensor.dim() > 1 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and tensor.shape[-1] % Q8_BLOCK:
            qtype = gguf.GGMLQuantizationType.F16
            kept_f16.append(hf_name)
        plan.append(_Planned(f"{gguf_stem}.{suffix}", hf_name, qtype, tuple(tensor.shape)))
    notes = [f"{len(kept_f16)} matrices have rows not divisible by {Q8_BLOCK} and are stored in f16: "
             f"{', '.join(kept_f16[:3])}{' ...' if len(kept_f16) > 3 else ''}"] if kept_f16 else []
    return plan, notes


def _encoded(plan: list[_Planned], state: dict[str, torch.Tensor], arch: Architecture, heads: int,
             kv_heads: int) -> Iterator[np.ndarray]:
    """Each planned tensor's bytes, produced only when it is written."""
    import gguf

    for item in plan:
        tensor = state[item.hf_name].detach().to("cpu", torch.float32)
        if arch.rotate_pairs and item.hf_name.endswith("self_attn.q_proj.weight"):
            tensor = interleave_rotary_halves(tensor, heads)
        elif arch.rotate_pairs and item.hf_name.endswith("self_attn.k_proj.weight"):
            tensor = interleave_rotary_halves(tensor, kv_heads)
        if item.qtype == gguf.GGMLQuantizationType.BF16:
            yield tensor.to(torch.bfloat16).view(torch.int16).numpy()
        elif item.qtype == gguf.GGMLQuantizationType.F16:
            yield tensor.to(torch.float16).numpy()
        elif item.qtype == gguf.GGMLQuantizationType.F32:
            yield tensor.numpy()
        else:
            yield gguf.quants.quantize(tensor.numpy(), item.qtype)


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's output rows from halves ``[x.., y..]`` to pairs ``[x0, y0, x1, y1, ...]``."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)

