"""Where the server's memory goes, by device, read from what holds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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
