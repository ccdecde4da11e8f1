"""Which waiting requests join the running batch next: a pure function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from loraserve.scheduler.types import GenerationRequest

POLICIES = ("mixed", "grouped")


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 16
    """Most sequences decoded together in one forward pass."""
    max_batch_tokens: int = 8192
    """Most prompt + max_new_tokens summed over a batch (bounds its KV cache)."""
    policy: str = "mixed"
    """mixed: any adapters share a batch (one gathered LoRA matmul serves them all);
    grouped: one adapter per batch, the oldest request choosing it."""
    join_delay_s: float = 0.02
    """While rows decode, newcomers may wait this long to join together (see should_join)."""
    max_num_batched_tokens: int = 1024
    """Tokens one step computes at most: a decoding row counts one, and prefills take chunks of
    what is left (long prompts run over several steps, between decode steps)."""


def select_batch(waiting: Sequence[GenerationRequest], limits: BatchLimits,
                 running: Sequence[GenerationRequest] = ()) -> list[int]:
    """Indices into `waiting` (oldest first, all ready to run) of the requests that join now.

    Arrival order is kept: a request is skipped only when it does not fit the token budget
    or (grouped) is for another adapter. Under `grouped`, joiners must also be older than the
    oldest request for another adapter, so a busy adapter cannot hold the batch forever: it
    drains, and the oldest request picks the next adapter. An empty batch always takes the
    oldest request (validation keeps any single request within max_batch_tokens).
    """
    room = limits.max_batch_size - len(running)
    tokens = sum(r.token_budget for r in running)
    adapter = running[0].adapter if running else (waiting[0].adapter if waiting else None)
    chosen: list[int] = []
    for i, req in enumerate(waiting):
        if len(chosen) >= room:
            break
        if limits.policy == "grouped" and req.adapter != adapter:
            break
        if (running or chosen) and tokens + req.token_budget > limits.max_batch_tokens:
            continue
        chosen.append(i)
        tokens += req.token_budget
    return chosen


def should_join(ready: int, free_slots: int, running: int, oldest_wait_s: float, limits: BatchLimits) -> bool:
    """Whether ready requests join the running batch now.

    A prefill pauses every running row for one forward pass, so one prefill per arrival
    would halve decode throughput. Newcomers join at once when nothing runs, when they would
    fill half the free slots, or when the oldest has waited `join_delay_s`; otherwise they
    gather for a few steps and join together.
    """
    if ready == 0 or free_slots == 0:
        return False
    return running == 0 or ready >= max(1, free_slots // 2) or oldest_wait_s >= limits.join_delay_s


def fair_order(waiting: Sequence[GenerationRequest], running: Sequence[GenerationRequest] = (),
               last_admitted: Mapping[str, float] | None = None) -> list[int]:
    """Indices into `waiting` (oldest first), reordered so clients take turns.

    A request's turn is how many of its client's requests are running or ahead of it in the
    queue; lower turns go first. Equal turns go to the client admitted least recently
    (`last_admitted`: client -> time), then by arrival. So a client that queued a hundred
    requests gets one row per round like everyone else instead of the next hundred, and
    when rows free up one at a time they rotate among the clients that wait.
    """
    held: dict[str, int] = {}
    for req in running:
        held[req.client] = held.get(req.client, 0) + 1
    last = last_admitted or {}
    keys = []
    for i, req in enumerate(waiting):
        keys.append((held.get(req.client, 0), last.get(req.client, float("-inf")), i))
        held[req.client] = held.get(req.client, 0) + 1
    return [key[2] for key in sorted(keys)]
