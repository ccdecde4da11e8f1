"""Shadow versions: a share of the requests an adapter's active version serves is run again, in
the background, by its shadow version (registry.rollout.Shadow), and the two answers compared.

A shadow never delays or fails a real request: it is submitted only while nothing waits in the
queue and fewer than `max_running` shadows are out, it runs at the scheduler's lowest priority
(scheduler.admission.Admission._give_way sheds it as soon as a real request needs its place) and its answer
is never returned. What is kept: per shadow version, how many answers matched the served one
exactly, the share of token positions that agree, the answer's length and latency (metrics), and
a sample log (logger `loraserve.shadow`: every differing pair, one matching pair in SAMPLE_EVERY).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import replace

from loraserve.registry.passport import Status
from loraserve.scheduler.errors import LoraServeError
from loraserve.scheduler.scheduler import Scheduler, Ticket
from loraserve.scheduler.types import Completion, GenerationRequest

log = logging.getLogger("loraserve.shadow")

SAMPLE_EVERY = 20
TEXT_CHARS = 200
"""Text kept of each answer in the sample log."""
WAIT_S = 120.0
"""A shadow answer not in by then is dropped."""


def agreement(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Share of token positions where two answers agree, over the longer one (1.0 for two empty)."""
    longest = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / longest if longest else 1.0


class ShadowMirror:
    def __init__(self, registry, metrics=None, max_running: int = 4):
        self._registry = registry
        self._metrics = metrics
        self._max_running = max_running
        self._out: set[asyncio.Task] = set()
        self._inflight = 0
        """Shadows submitted and not yet settled."""
        self._matched = 0

    def mirror(self, scheduler: Scheduler, req: GenerationRequest) -> tuple[Ticket, str] | None:
        """Submit `req`'s shadow, if its adapter's active version served it and is shadowed, the
        draw says so and there is spare capacity: (its ticket, the shadow version); else None."""
        if req.adapter.is_base or req.requested:
            return None
        snap = self._registry.current()
        served, shadow = snap.get(req.adapter.id, req.adapter.version), snap.shadow(req.adapter.id)
        if served is None or served.status != Status.ACTIVE or shadow is None:
            return None
        if random.random() * 100 >= shadow.shadow.percent:
            return None
        ref = self._registry.ref_of(shadow)
        # `req` itself has just been queued: anything more waiting means no spare capacity.
        if scheduler.queue_depth > 1 or self._inflight >= self._max_running or self._registry.gate(shadow):
            self._count(req.adapter.id, ref.version, "skipped")
            return None
        mirrored = replace(req, adapter=ref, request_id=f"{req.request_id}~shadow", shadow=True, client="~shadow",
                           fallback_to_base=False)
        try:
            ticket = scheduler.submit(mirrored)
        except LoraServeError:
            self._count(req.adapter.id, ref.version, "skipped")
            return None
        self._inflight += 1
        return ticket, ref.version

    def settle(self, mirrored: tuple[Ticket, str] | None, served: Completion | None) -> None:
        """The real request ended (`served` None: it failed): compare once the shadow is in."""
        if mirrored is None:
            return
        ticket, version = mirrored
        if served is None:
            ticket.cancel()
            self._inflight -= 1
            return
        task = asyncio.get_running_loop().create_task(self._compare(ticket, version, served))
        self._out.add(task)
        task.add_done_callback(self._out.discard)

    async def _compare(self, ticket: Ticket, version: str, served: Completion) -> None:
        name = served.adapter.id
        try:
            shadow = await asyncio.wait_for(ticket.result(), WAIT_S)
        except LoraServeError as exc:
            self._count(name, version, "shed" if exc.reason == "SHADOW_SHED" else "error")
            return
        except asyncio.TimeoutError:
            ticket.cancel()
            self._count(name, version, "error")
            return
        finally:
            self._inflight -= 1
        same = shadow.text == served.text
        agree = agreement(shadow.token_ids, served.token_ids)
        seconds = max(shadow.timeline.finished - shadow.timeline.enqueued, 0.0)
        if self._metrics is not None:
            self._metrics.shadow_done(name, version, same, agree, shadow.output_tokens, seconds)
        self._matched += same
        if not same or self._matched % SAMPLE_EVERY == 1:
            log.info(json.dumps({
                "request_id": served.request_id, "served": served.adapter.key, "shadow": shadow.adapter.key,
                "match": same, "token_agreement": round(agree, 4), "served_tokens": served.output_tokens,
                "shadow_tokens": shadow.output_tokens, "shadow_ms": round(seconds * 1e3, 1),
                "served_text": served.text[:TEXT_CHARS], "shadow_text": shadow.text[:TEXT_CHARS]}))

    def _count(self, name: str, version: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.shadow_outcome(name, version, outcome)

    async def close(self) -> None:
        for task in list(self._out):
            task.cancel()
        if self._out:
            await asyncio.gather(*self._out, return_exceptions=True)
