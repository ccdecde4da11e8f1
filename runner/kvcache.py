"""A KV cache whose appends write in place.

transformers' DynamicLayer appends each decode step's key and value with torch.cat, copying the
whole [B, heads, seq, dim] cache every step, per layer; on a CPU that copy was a fifth of a decode
step. Here `keys`/`values` are views of buffers with spare room along the sequence, so a step
writes one column. The engine still reassigns keys/values when rows leave or join (select,
merge, trim); the next append sees the view is not its own and moves into a fresh buffer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_MIN_ROOM = 64


class SlackLayer(DynamicLayer):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            self.lazy_initialization(key_states, value_states)
            self._adopt(key_states, value_states, key_states.shape[-2])
            return self.keys, self.values
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if self.keys is not self._view or length + new > self._buffers[0].shape[-2]:
            self._adopt(self.keys, self.values, new)
        k_buf, v_buf = self._buffers
        k_buf[:, :, length:length + new] = key_states
        v_buf[:, :, length:length + new] = value_states
        self.keys, self.values = k_buf[:, :, :length + new], v_buf[:, :, :length + new]
        self._view = self.keys
        return self.keys, self.values

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor, upcoming: int) -> None:
        """Copy keys/values to the front of new buffers with room for `upcoming` tokens and more."""
        length = keys.shape[-2]
        room = length + max(upcoming, length, _MIN_ROOM)
        buffers = []
        for t in (keys, values):
            buf = t.new_empty((*t.shape[:-2], room, t.shape[-1]))
            buf[:, :, :length] = t
            buffers.append(buf)
        self._buffers = tuple(buffers)
        self.keys, self.values = buffers[0][:, :, :length], buffers[1][:, :, :length]
        self._view = self.keys


def slack_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = SlackLayer
    return cache
