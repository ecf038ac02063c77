"""A scalar head on a causal LM's final hidden states: the reward model's score, PPO's critic.

One ``nn.Linear(hidden, 1)`` kept in fp32. It is attached to the trained model as the
submodule ``value_head``, so the optimizer, the checkpoints (which store every trainable
parameter by name) and ``--resume`` pick it up like any other trainable weight; at the end
of a run it is written on its own to ``value_head.safetensors`` (``RunDir.value_head``),
beside the method's adapter, so a reward model is "base + adapter + head" and the base is never duplicated.

A sequence's score is read at its *last* real token: with a causal model that is the only
position that has seen the whole prompt and answer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from tunelab.errors import ConfigError
from tunelab.io import atomic_open
from tunelab.models.forward import Batch, hidden_states
from tunelab.runs import RunDir

VALUE_HEAD_ATTR = "value_head"


class ValueHead(nn.Module):
    """``hidden [..., H] -> score [...]`` in fp32, whatever the model's dtype or autocast.

    fp32 because a reward or value is one number regressed against targets whose
    differences matter (Bradley-Terry margins, GAE returns): bf16's 8 bits of mantissa
    would round them away. Initialised to zero: a reward model starts neutral (every pair
    tied, loss ln 2) and a critic starts at value 0 instead of at random values that the
    clipped value loss could only walk back ``ppo.cliprange_value`` per rollout; the
    gradient with respect to the weights is not zero, so both train from there.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @property
    def hidden_size(self) -> int:
        return self.linear.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.linear(hidden.float()).squeeze(-1)


def hidden_size_of(model: nn.Module) -> int:
    """Width of the final hidden states, read from the input embeddings (works through any wrapper)."""
    return int(model.get_input_embeddings().weight.shape[1])


def attach_value_head(model: nn.Module) -> ValueHead:
    """Create a trainable head on ``model``'s device and register it as ``model.value_head``."""
    device = next(model.parameters()).device
    head = ValueHead(hidden_size_of(model)).to(device)
    setattr(model, VALUE_HEAD_ATTR, head)
    return head


def last_token_index(sequence_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Flat position (row * T + column) of each sequence's last token [num_sequences].

    Works for padded rows and for packed rows holding several sequences, because the
    batch says which sequence every token belongs to (``sequence_index``, -1 = padding).
    """
    rows, width = sequence_index.shape
    flat = torch.arange(rows * width, device=sequence_index.device)
    valid = sequence_index.reshape(-1) >= 0
    last = torch.full((num_sequences,), -1, dtype=torch.long, device=sequence_index.device)
    last = last.scatter_reduce(0, sequence_index.reshape(-1)[valid], flat[valid], reduce="amax")
    if bool((last < 0).any()):
        raise ValueError("every sequence needs at least one token in sequence_index")
    return last


def padded_sequence_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``sequence_index`` of a padded batch: row r is sequence r, padding is -1."""
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device).unsqueeze(1)
    return torch.where(attention_mask.bool(), rows, torch.full_like(attention_mask, -1))


def sequence_scores(model: nn.Module, head: ValueHead, batch: Batch) -> torch.Tensor:
    """The head's score of every sequence of ``batch`` at its last token, [num_sequences] fp32."""
    hidden, _ = hidden_states(model, batch)
    last = last_token_index(batch["sequence_index"], int(batch["num_sequences"]))
    return head(hidden.reshape(-1, hidden.shape[-1])[last])


def save_value_head(head: ValueHead, run_dir: str | Path) -> Path:
    """Write ``RunDir(run_dir).value_head`` atomically (a crash leaves the old file or none)."""
    target = RunDir(run_dir).value_head
    tensors = {name: t.detach().cpu().contiguous() for name, t in head.state_dict().items()}
    with atomic_open(target, "wb") as handle:
        handle.write(save(tensors, metadata={"hidden_size": str(head.hidden_size)}))
    return target


def load_value_head(run_dir: str | Path, hidden_size: int, device: torch.device | str = "cpu") -> ValueHead:
    """The frozen head saved in ``run_dir``, checked against the model it will read from."""
    path = RunDir(run_dir).value_head
    if not path.is_file():
        raise ConfigError(f"{path} does not exist, so {run_dir} is not a trained reward model. Pass the output_dir "
                          "of a finished `stage: rm` run (its value head is written when training ends).")
    tensors = load_file(str(path))
    saved = tensors["linear.weight"].shape[-1]
    if saved != hidden_size:
        raise ConfigError(f"{path} scores hidden states of width {saved}, but this model's are {hidden_size} wide: "
                          "the reward model was trained on another base model. Use a reward model trained on the "
                          "same model.name_or_path.")
    head = ValueHead(hidden_size)
    head.load_state_dict(tensors)
    return head.to(device).requires_grad_(False).eval()
