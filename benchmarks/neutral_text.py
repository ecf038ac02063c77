"""Which text should virtual tokens start from? (tunelab.methods.prompts.NEUTRAL_INIT_TEXT)

A prompt-learning method initialised from a text starts as the base model reading that text
before every input. The best default text is the one that changes the base least: this
script writes each candidate before 32 questions (the identity eval split and general
instructions) and reports, over the answer tokens, the KL divergence from the base's next-token
distribution to the prefixed one, the answer loss, and how often the top-1 token is unchanged.

    python benchmarks/neutral_text.py                       # the candidates below
    python benchmarks/neutral_text.py "My text.\\n" "Other"  # your own (escapes allowed)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tunelab.config import build_config
from tunelab.data.batching import collate_examples, model_inputs
from tunelab.data.pipeline import build_data
from tunelab.models.loader import load_base

CANDIDATES = ["The following is a conversation.\n", "A conversation.\n\n", "You are a helpful assistant.\n",
              "Below is a conversation between a user and a helpful assistant.\n", "\n", " ", "<|endoftext|>",
              "<|im_start|>"]
QUESTIONS = 32


@torch.no_grad()
def answer_logprobs(model, prefix: list[int], batch: dict) -> torch.Tensor:
    """Log-probs [B, T-1, V] at the batch's positions, with ``prefix`` token ids written before every row."""
    inputs = model_inputs(batch)
    ids = inputs.pop("input_ids")
    head = torch.tensor(prefix, dtype=ids.dtype).expand(ids.shape[0], -1)
    positions = torch.arange(len(prefix) + ids.shape[1]).expand(ids.shape[0], -1)
    logits = model(input_ids=torch.cat([head, ids], dim=1), position_ids=positions).logits
    return F.log_softmax(logits[:, len(prefix):-1].float(), dim=-1)


def main(candidates: list[str]) -> None:
    cfg = build_config({"data": {"dataset_dir": "examples/data", "train": ["identity_eval", "alpaca_demo"],
                                 "max_length": 256}})
    model, tokenizer = load_base(cfg.model, torch.device("cpu"), torch.float32)
    model.eval()
    data = build_data(cfg, tokenizer)
    batch = collate_examples([data.train[i] for i in range(min(QUESTIONS, len(data.train)))],
                             tokenizer.pad_token_id, False)
    labels = batch["labels"][:, 1:]
    answer = labels != -100
    base = answer_logprobs(model, [], batch)
    print(f"{'text':70} {'KL to base':>10} {'answer loss':>11} {'top-1 same':>10}")
    base_loss = -base.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[answer].mean()
    print(f"{'(none: the base)':70} {0.0:10.4f} {base_loss:11.4f} {1.0:10.3f}", flush=True)
    for text in candidates:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = (ids * -(-20 // len(ids)))[:20]  # 20 virtual tokens, the default, as the methods fill them
        logp = answer_logprobs(model, prefix, batch)
        kl = (base.exp() * (base - logp)).sum(-1)[answer].mean()
        loss = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[answer].mean()
        same = (base.argmax(-1) == logp.argmax(-1))[answer].float().mean()
        print(f"{text!r:70} {kl:10.4f} {loss:11.4f} {same:10.3f}", flush=True)


if __name__ == "__main__":
    main([arg.encode().decode("unicode_escape") for arg in sys.argv[1:]] or CANDIDATES)
