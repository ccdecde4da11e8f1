"""Where the server's memory goes, by device, read from what holds it."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Callable


def tensor_bytes(module) -> dict[str, int]:
    """Bytes of a torch module's parameters and buffers by device ("cpu", "cuda:0"): a
    quantized model counts its packed weights as they are held."""
    held: Counter[str] = Counter()
    for t in itertools.chain(module.parameters(), module.buffers()):
        held[str(t.device)] += t.nbytes
    return dict(held)


@dataclass(frozen=True)
class EngineMemory:
    """The engine's parts. The base weights do not change once loaded, so they are measured
    once; the KV pool and the adapter slot stacks are read when asked."""

    weights: dict[str, int]
    """Base model bytes by device."""
    kv_bytes: Callable[[], int]
    stack_bytes: Callable[[], int]

    @property
    def device(self) -> str:
        """The compute device: where most of the weights are (the KV pool and slot stacks live there)."""
        return max(self.weights, key=self.weights.__getitem__)
