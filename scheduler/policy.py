"""Batch selection: a pure function over the waiting queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from scheduler.types import GenerationRequest


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 16
    """Most sequences decoded together in one forward pass."""
    max_batch_tokens: int = 8192
    """Most prompt + max_new_tokens summed over a batch (bounds its KV cache)."""


def select_batch(waiting: Sequence[GenerationRequest], limits: BatchLimits) -> list[int]:
    """Indices (into `waiting`, oldest first) of the next batch.

    The oldest request picks the adapter, so no adapter waits behind a busier one
    for more than one batch; later requests for the same adapter join it in
    arrival order while size and token limits allow. The oldest request always
    fits: validation rejects one whose budget alone exceeds max_batch_tokens.
    """
    if not waiting:
        return []
    adapter = waiting[0].adapter
    chosen, tokens = [], 0
    for i, req in enumerate(waiting):
        if len(chosen) == limits.max_batch_size:
            break
        if req.adapter != adapter:
            continue
        if chosen and tokens + req.token_budget > limits.max_batch_tokens:
            continue
        chosen.append(i)
        tokens += req.token_budget
    return chosen
