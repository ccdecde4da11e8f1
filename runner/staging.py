"""Host values a step sends to the device: packed into one preallocated host buffer (page-locked
on cuda) and copied in once, asynchronously.

A copy from ordinary (pageable) memory makes torch synchronise the stream, so a step built from
`torch.tensor(list)`s and `.to(device)`s waits for the device once per tensor; from page-locked
memory, `copy_(non_blocking=True)` only queues the copy. A step therefore writes everything the
device needs from the host (its rows' tokens, lengths, adapter slots and block tables; their
sampling parameters) as one flat list into the front of a `Staging`'s host buffer and reads it
back on the device as views of one copy.

Reusing a page-locked buffer is safe once the copy out of it has run: each step ends with its one
device-to-host transfer (runner/steps.py `_fetch`), which orders it after every earlier copy, so
the next `send` finds its event complete. Only after a step that raised between its copy and that
transfer can the event still be pending; `send` then waits for it rather than overwrite what the
copy has yet to read. Off cuda the buffers are plain tensors and the copy a memcpy.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Staging:
    def __init__(self, numel: int, device: torch.device, dtype: torch.dtype = torch.int64):
        self._device, self._dtype = device, dtype
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self._allocate(max(numel, 1))

    def _allocate(self, numel: int) -> None:
        self._host = torch.empty(numel, dtype=self._dtype, pin_memory=self._device.type == "cuda")
        self._view = self._host.numpy()  # numpy (a transformers dependency) fills it from a list 3-4x faster
        self._dev = torch.empty(numel, dtype=self._dtype, device=self._device)

    @property
    def capacity(self) -> int:
        return self._host.numel()

    def send(self, values: Sequence[int | float]) -> torch.Tensor:
        """`values` on the device: a view of the front of the device buffer, valid until the next send."""
        n = len(values)
        if self._event is not None and not self._event.query():
            self._event.synchronize()  # only after a step that raised before its fetch (see above)
        if n > self.capacity:  # sized for max_rows: never, unless a caller sends more rows than that
            self._allocate(max(n, 2 * self.capacity))
        self._view[:n] = values
        dev = self._dev[:n]
        dev.copy_(self._host[:n], non_blocking=True)
        if self._event is not None:
            self._event.record()
        return dev


def decode_rows(tokens: Sequence[int], lengths: Sequence[int], slots: Sequence[int],
                tables: Sequence[Sequence[int]], pad: int, pad_token: int, pad_block: int) -> tuple[list[int], int]:
    """A decode step's inputs as one flat list: tokens, lengths and LoRA slots ([3, rows]), then the
    block tables ([rows, width], each padded with `pad_block`); the last `pad` of the rows are
    padding rows (`pad_token` at position 0, no adapter, every block `pad_block`). -> (values, width)."""
    width = max(len(t) for t in tables)
    flat = [*tokens, *[pad_token] * pad, *lengths, *[0] * pad, *slots, *[0] * pad]
    for table in tables:
        flat += table
        if len(table) < width:
            flat += [pad_block] * (width - len(table))
    if pad:
        flat += [pad_block] * (pad * width)
    return flat, width


def decode_views(dev: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_rows`' values on the device -> ([3, rows] tokens/lengths/slots, [rows, width] tables)."""
    return dev[:3 * rows].view(3, rows), dev[3 * rows:].view(rows, width)
