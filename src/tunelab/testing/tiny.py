"""Tiny random models and a small tokenizer for tests and examples (no network, seconds).

The tokenizer is a byte-level BPE trained on a fixed corpus with ChatML special tokens and
a ChatML chat template, so every code path that the real SmolLM2 tokenizer exercises
(special tokens, chat template, generation prompt) is exercised here too.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Who are you? I am Tuna, an assistant trained with tunelab.",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system You are a helpful assistant.",
    "Write a short poem about the sea. Waves fold silver into the shore.",
    "1 2 3 4 5 6 7 8 9 0 + - * / = ( ) [ ] { } : ; , . ! ? ' \"",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "Instruction: translate to French. Input: hello. Output: bonjour.",
]


def tiny_tokenizer(vocab_size: int = 512):
    """A trained byte-level BPE tokenizer with ChatML tokens (pad = <|im_end|>, like SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    params = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer Llama with hidden size 64, random weights, fp32, SDPA attention."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size, **overrides)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def save_tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    """Write a loadable HF directory (weights + tokenizer + chat template) for loader-level tests."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
