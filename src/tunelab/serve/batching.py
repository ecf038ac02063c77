"""Continuous batching: one running batch per model id that advances one token per step.

Why our own and not transformers' ``ContinuousBatchingManager``: that manager runs its own
background thread over one model with its own paged-attention cache, while a served
module carries several PEFT adapters selected by global state (``set_adapter``) that only
the engine's worker may switch; and each served row needs its own stop strings, streaming,
cancellation and seed. A ``DynamicCache`` kept by us (its layers write each step in place,
:class:`_BufferedLayer`) does all of that with the model's ordinary forward.

The batch is left-padded: row ``i`` holds its tokens in the rightmost columns of the key /
value cache and of the attention mask, so every step appends one column for all rows.
Rows join after a prefill of their own (new prompts are prefilled together, then their
cache is left-padded to the batch's width and concatenated), and leave as soon as they end
(eos, end of turn, a stop string, their ``max_tokens``, or their client going away); the
columns no remaining row uses are trimmed. Position ids come from each row's own count of
real tokens, as in ``generate`` with left padding, so a row's tokens are the ones it would
get alone (greedy decoding; up to floating-point rounding of a different batch shape).

Only models whose whole state is in the module run here: PEFT prompt learning (prefix,
prompt and P-tuning, MAM's prefix) feeds virtual tokens or key/value prefixes of its own,
and sliding-window or hybrid caches do not fit a left-padded cache, so :func:`steppable`
sends those models to :func:`tunelab.inference.complete` instead.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tunelab.inference import (Completion, GenerationOptions, GenerationRow, _RowState, left_pad,
                               stop_token_ids)
from tunelab.serve.engine import ServedModel
from tunelab.serve.sampling import TokenChooser, choose_tokens

#: Most (rows x padded prompt width) tokens prefilled in one forward pass; longer groups are split.
PREFILL_TOKENS = 4096
#: A prefill group's longest prompt is at most this times its shortest: padding is computed too.
PREFILL_SPREAD = 1.25
#: Spare columns of a cache buffer: it is copied once every this many steps, not every step.
CACHE_GROWTH = 64


def steppable(module: nn.Module) -> bool:
    """Whether ``module`` generates correctly from our left-padded ``DynamicCache`` alone."""
    peft_config = getattr(module, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return False
    layers = DynamicCache(config=module.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def supported(options: GenerationOptions) -> bool:
    """Whether a row with ``options`` can join a running batch (no beams, no repetition penalty)."""
    return options.num_beams == 1 and options.repetition_penalty == 1.0


def prefill_groups(rows: Sequence[Any], lengths: Sequence[int], budget: int = PREFILL_TOKENS,
                   spread: float = PREFILL_SPREAD) -> list[list[Any]]:
    """``rows`` grouped by length for prefilling: within a group the longest is at most ``spread``
    times the shortest and count x longest stays within ``budget`` (a longer row is a group alone).

    Why: a group is one left-padded forward pass, and the padding costs as much as real tokens;
    prompts of 39 to 161 tokens prefilled as one block cost 2.4x their real tokens.
    """
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    groups: list[list[Any]] = []
    shortest = 0
    for i in order:
        if groups and lengths[i] <= shortest * spread and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(rows[i])
        else:
            groups.append([rows[i]])
            shortest = lengths[i]
    return groups


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros in front along ``dim`` (counted from the end) up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    padding = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, padding)


class _BufferedLayer(DynamicLayer):
    """A cache layer whose keys and values sit in a buffer with spare columns at the end.

    Why: ``DynamicLayer`` concatenates on every step, copying the cache of every row (14% of
    a 32-row SmolLM2 decode step); here a step writes its column in place and the buffer is
    copied only when full. ``keys`` / ``values`` are views of the filled part, so the model
    and the rest of transformers see an ordinary layer.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self.store(keys, values)

    def store(self, keys: torch.Tensor, values: torch.Tensor, needed: int = 0) -> None:
        """Hold copies of ``keys`` / ``values`` ([rows, heads, width, dim]) with free columns, ``needed`` at least."""
        spare = max(CACHE_GROWTH, needed)
        self.width = keys.shape[-2]
        self._keys = F.pad(keys, (0, 0, 0, spare))
        self._values = F.pad(values, (0, 0, 0, spare))
        self._expose()

    def _expose(self) -> None:
        self.keys, self.values = self._keys[..., :self.width, :], self._values[..., :self.width, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self.width + new > self._keys.shape[-2]:
            self.store(self.keys, self.values, needed=new)
        self._keys[..., self.width:self.width + new, :] = key_states
        self._values[..., self.width:self.width + new, :] = value_states
        self.width += new
        self._expose()
        return self.keys, self.values


@dataclass
class _Slot:
    row: GenerationRow
    state: _RowState
    chooser: TokenChooser


class DecodeBatch:
    """The running rows of one model id and their key/value cache (see the module docstring)."""

    def __init__(self, model: ServedModel):
        self.model = model
        loaded = model.run
        self._module = loaded.model
        self._tokenizer = loaded.tokenizer
        self._stop_ids = set(stop_token_ids(loaded))
        pad = loaded.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._stop_ids)
        self._device = next(self._module.parameters()).device
        base = self._module.get_base_model() if hasattr(self._module, "get_base_model") else self._module
        self._keep_last = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._slots: list[_Slot] = []
        self._cache: DynamicCache | None = None  # holding _BufferedLayer layers
        self._mask: torch.Tensor | None = None  # [rows, width]: 1 where the cache holds a real token
        self._tokens: torch.Tensor | None = None  # [rows, 1]: each row's last chosen token, fed next
        self._positions: torch.Tensor | None = None  # [rows, 1]: the position id of that token

    supports = staticmethod(supported)

    def __len__(self) -> int:
        return len(self._slots)

    # -- joining ------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, rows: Sequence[tuple[GenerationRow, int]]) -> None:
        """Prefill ``rows`` ((row, choice index in its request)), choose their first token, join the batch."""
        for group in prefill_groups(rows, [len(row.prompt_ids) for row, _ in rows]):
            encoded = left_pad([row.prompt_ids for row, _ in group], self._pad_id, self._device)
            mask = encoded["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache(config=self._module.config)
            logits = self._forward(encoded["input_ids"], mask, positions, cache)
            slots = [_Slot(row, _RowState(row, self._tokenizer, self._stop_ids),
                           TokenChooser(row.options, choice, self._device)) for row, choice in group]
            tokens = self._choose(logits, slots)
            self._join(slots, cache, mask, tokens, positions[:, -1:] + 1)

    def _join(self, slots: list[_Slot], cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor,
              positions: torch.Tensor) -> None:
        if self._cache is None:
            cache.layers = [_BufferedLayer(layer.keys, layer.values) for layer in cache.layers]
            self._slots, self._cache, self._mask, self._tokens, self._positions = slots, cache, mask, tokens, positions
            return
        assert self._mask is not None and self._tokens is not None and self._positions is not None
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._layers(), cache.layers):
            mine.store(torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)]),
                       torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)]))
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(mask, width, -1)])
        self._tokens = torch.cat([self._tokens, tokens])
        self._positions = torch.cat([self._positions, positions])
        self._slots += slots

    def _layers(self) -> list[_BufferedLayer]:
        assert self._cache is not None
        return cast("list[_BufferedLayer]", self._cache.layers)

    # -- generating ---------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One token for every running row."""
        if not self._slots:
            return
        assert self._mask is not None and self._tokens is not None and self._positions is not None
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits = self._forward(self._tokens, self._mask, self._positions, self._cache)
        self._tokens = self._choose(logits, self._slots)
        self._positions = self._positions + 1

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache | None) -> torch.Tensor:
        """The next-token logits ([rows, vocab], fp32) of the last column; fills ``cache``."""
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        with self.model.activate():
            out = self._module(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True, **extra)
        return out.logits[:, -1, :].float()

    def _choose(self, logits: torch.Tensor, slots: list[_Slot]) -> torch.Tensor:
        tokens = choose_tokens(logits, [slot.chooser for slot in slots])
        for slot, token in zip(slots, tokens):
            if slot.state.reason is None:  # a row that ended stays until pop_finished; it takes no more tokens
                slot.state.add(token)
        return torch.tensor(tokens, dtype=torch.long, device=self._device).unsqueeze(1)

    # -- leaving ------------------------------------------------------------------------
    @torch.inference_mode()
    def pop_finished(self) -> list[tuple[GenerationRow, Completion]]:
        """Rows that ended (or whose client went away), removed from the batch with their cache."""
        for slot in self._slots:
            if slot.state.reason is None and slot.row.cancelled is not None and slot.row.cancelled.is_set():
                slot.state.reason = "cancelled"
        ended = [slot for slot in self._slots if slot.state.reason is not None]
        if not ended:
            return []
        keep = [i for i, slot in enumerate(self._slots) if slot.state.reason is None]
        self._slots = [self._slots[i] for i in keep]
        if keep:
            self._select(torch.tensor(keep, device=self._device))
        else:
            self._cache = self._mask = self._tokens = self._positions = None
        return [(slot.row, slot.state.finish()) for slot in ended]

    def _select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep``, then drop the leading columns none of them uses."""
        assert self._cache is not None and self._mask is not None
        assert self._tokens is not None and self._positions is not None
        mask = self._mask[keep]
        first = int(mask.any(dim=0).int().argmax())
        self._mask, self._tokens, self._positions = mask[:, first:], self._tokens[keep], self._positions[keep]
        for layer in self._layers():
            layer.store(layer.keys[keep, :, first:], layer.values[keep, :, first:])

    def abort(self) -> list[GenerationRow]:
        """Drop every row (after a failed step) and return them."""
        rows = [slot.row for slot in self._slots]
        self._slots = []
        self._cache = self._mask = self._tokens = self._positions = None
        return rows
