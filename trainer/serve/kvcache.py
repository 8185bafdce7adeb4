"""The decode batch's KV cache layer: room to grow, so a decode step does not copy the whole cache.

transformers' `DynamicLayer` appends a step's keys and values with `torch.cat`, which copies every
cached position of every row on every step: for a small model serving a few streams that copy
costs as much as the attention itself (10-20% of a decode step, measured with py-spy on the 21M
benchmark Llama). `GrowingLayer` keeps its keys and values in buffers with spare positions at the
end and writes each step into them in place; a buffer is reallocated (with half again as much
room) only when it is full, so the copying is amortised to O(1) per position.

Everything else about it is `DynamicLayer`: `keys`/`values` read as `[rows, heads, length, dim]`
tensors (views of the buffers) and may be assigned whole, as the decode batch does when it merges,
trims or selects rows; an assignment becomes the new buffer, without spare room until the next
append.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer

MIN_ROOM = 64
"""Spare positions allocated at least whenever a buffer grows (a short answer never regrows)."""


def _append(buffer: Any, length: int, states: Any) -> tuple[Any, int]:
    """`states` ([rows, heads, new, dim]) written after the first `length` positions of `buffer`;
    returns the buffer (the same one while it has room) and the new length."""

    new = states.shape[-2]
    if buffer is None or buffer.dim() != states.dim() or buffer.shape[:-2] != states.shape[:-2]:
        buffer, length = None, 0
    if buffer is None or length + new > buffer.shape[-2]:
        room = length + new + max(MIN_ROOM, (length + new) // 2)
        grown = states.new_empty((*states.shape[:-2], room, states.shape[-1]))
        if buffer is not None and length:
            grown[..., :length, :] = buffer[..., :length, :]
        buffer = grown
    buffer[..., length:length + new, :] = states
    return buffer, length + new


def _length(tensor: Any) -> int:
    return tensor.shape[-2] if tensor is not None and tensor.dim() >= 2 else 0


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose appends write into spare room instead of concatenating."""

    def __init__(self) -> None:
        self._key_buffer: Any = None
        self._value_buffer: Any = None
        self._key_length = 0
        self._value_length = 0
        super().__init__()

    @property
    def keys(self) -> Any:
        buffer = self._key_buffer
        return buffer if buffer is None or buffer.dim() < 2 else buffer[..., :self._key_length, :]

    @keys.setter
    def keys(self, tensor: Any) -> None:
        self._key_buffer, self._key_length = tensor, _length(tensor)

    @property
    def values(self) -> Any:
        buffer = self._value_buffer
        return buffer if buffer is None or buffer.dim() < 2 else buffer[..., :self._value_length, :]

    @values.setter
    def values(self, tensor: Any) -> None:
        self._value_buffer, self._value_length = tensor, _length(tensor)

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._key_buffer, self._key_length = _append(self._key_buffer, self._key_length, key_states)
        self._value_buffer, self._value_length = _append(self._value_buffer, self._value_length, value_states)
        return self.keys, self.values


def growing_cache(config: Any) -> Any:
    """A `DynamicCache` for `config` whose plain full-attention layers are `GrowingLayer`s (sliding
    window and other special layers stay as transformers made them)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def is_plain_layer(layer: Any) -> bool:
    """Whether `layer` is a full-attention layer the decode batch may pad, merge and trim."""
    return type(layer) in (DynamicLayer, GrowingLayer)
