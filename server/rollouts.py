"""The canary's watch: per-version figures of the requests a canary split, and the automatic
rollback when the canary's limits (registry.rollout.Limits) are breached.

Only requests that named the adapter without a version take part: they are the ones the split
routed, to the canary or to the stable version, so both sides see the same traffic. A breach
stops routing to the canary at once (AdapterRegistry.abort_canary, in this process), then
writes the canary `aborted`, with the figures that tripped it, into the store, from where every
other replica reads it by hot reload.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

from loraserve.registry.rollout import Limits
from loraserve.scheduler.types import Completion

log = logging.getLogger(__name__)

NOT_THE_VERSIONS_FAULT = frozenset({
    "OK", "INVALID_ARGUMENT", "CANCELLED", "DEADLINE_EXCEEDED", "QUEUE_FULL", "CLIENT_STREAM_LIMIT",
    "EXPECTED_WAIT_EXCEEDS_DEADLINE", "SHUTTING_DOWN", "NOT_READY", "UNAUTHENTICATED", "PERMISSION_DENIED",
    "ADAPTER_NOT_FOUND", "ADAPTER_AMBIGUOUS", "ADAPTER_BUSY", "CACHE_FULL",
})
"""Outcomes a version did not cause (the caller's, or the server's load); every other status, and
an answer the base model gave because the version could not, is the version's error."""


@dataclass(frozen=True)
class Split:
    """A request the canary of `name` routed: to `version`, the canary or the stable one."""

    name: str
    version: str
    canary_version: str
    stable_version: str
    limits: Limits
    started_at: str
    """The canary's: figures are its own, never an earlier canary's."""

    @property
    def to_canary(self) -> bool:
        return self.version == self.canary_version


@dataclass(frozen=True)
class Sample:
    at: float
    error: bool
    ttft_s: float | None


def figures(samples: list[Sample]) -> dict:
    """requests, errors, error_rate, ttft_p95_s (None without a first token among them)."""
    errors = sum(s.error for s in samples)
    ttfts = sorted(s.ttft_s for s in samples if s.ttft_s is not None)
    p95 = ttfts[min(len(ttfts) - 1, math.ceil(0.95 * len(ttfts)) - 1)] if ttfts else None
    return {"requests": len(samples), "errors": errors, "error_rate": errors / len(samples) if samples else 0.0,
            "ttft_p95_s": p95}


def judge(canary: list[Sample], stable: list[Sample], limits: Limits) -> str | None:
    """Why the canary must be aborted, or None: its error rate above the limit and above the
    stable version's, or its time-to-first-token p95 above the ratio to the stable's; judged once
    the canary has min_requests in the window (the ratio also needs the stable's)."""
    if len(canary) < limits.min_requests:
        return None
    c, s = figures(canary), figures(stable)
    if c["error_rate"] > limits.max_error_rate and c["error_rate"] > s["error_rate"]:
        return (f"error rate {c['error_rate']:.3f} over {c['requests']} requests exceeds {limits.max_error_rate:g} "
                f"(stable: {s['error_rate']:.3f} over {s['requests']})")
    if (len(stable) >= limits.min_requests and c["ttft_p95_s"] is not None and s["ttft_p95_s"]
            and c["ttft_p95_s"] > limits.max_ttft_p95_ratio * s["ttft_p95_s"]):
        return (f"time-to-first-token p95 {c['ttft_p95_s'] * 1000:.0f} ms is {c['ttft_p95_s'] / s['ttft_p95_s']:.2f}x "
                f"the stable version's {s['ttft_p95_s'] * 1000:.0f} ms (limit {limits.max_ttft_p95_ratio:g}x)")
    return None


class RolloutWatch:
    def __init__(self, registry, metrics=None, clock=time.monotonic):
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._samples: dict[tuple[str, str, str], deque[Sample]] = {}
        """(adapter, canary started_at, version) -> its requests in the window."""
        self._writes: set[asyncio.Task] = set()

    def observe(self, split: Split | None, status: str, completion: Completion | None) -> None:
        """One finished request; judged at once (a breach aborts the canary)."""
        if split is None:
            return
        now = self._clock()
        error = status not in NOT_THE_VERSIONS_FAULT or bool(completion and completion.fallback_reason)
        ttft = None
        if completion is not None and not error and completion.output_tokens:
            ttft = max(completion.timeline.first_token - completion.timeline.enqueued, 0.0)
        self._window(split, split.version, now).append(Sample(now, error, ttft))
        if self._metrics is not None:
            self._metrics.canary_request(split.name, split.version, "canary" if split.to_canary else "stable", error)
        canary = list(self._window(split, split.canary_version, now))
        stable = list(self._window(split, split.stable_version, now))
        reason = judge(canary, stable, split.limits)
        if reason is not None and self._registry.abort_canary(split.name, split.canary_version):
            self._aborted(split, reason, {"canary": figures(canary), "stable": figures(stable),
                                          "limits": vars(split.limits)})

    def _window(self, split: Split, version: str, now: float) -> deque[Sample]:
        samples = self._samples.setdefault((split.name, split.started_at, version), deque())
        while samples and samples[0].at < now - split.limits.window_s:
            samples.popleft()
        return samples

    def _aborted(self, split: Split, reason: str, found: dict) -> None:
        key = f"{split.name}@{split.canary_version}"
        log.error("canary %s aborted: %s; %s@%s serves every request naming %s", key, reason, split.name,
                  split.stable_version, split.name)
        if self._metrics is not None:
            self._metrics.canary_aborted(split.name)
        for version in (split.canary_version, split.stable_version):
            self._samples.pop((split.name, split.started_at, version), None)
        task = asyncio.get_running_loop().create_task(self._record(split, reason, found))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _record(self, split: Split, reason: str, found: dict) -> None:
        """Into the store, so every replica (and `adapters show`) sees it; a failed write is logged:
        this process has already stopped routing to the canary."""
        try:
            await asyncio.to_thread(self._registry.store.abort_canary, split.name, split.canary_version, reason,
                                    found)
        except Exception as exc:  # noqa: BLE001 - the store may be unreachable; routing has stopped here
            log.error("could not record canary %s@%s as aborted in the store: %s", split.name,
                      split.canary_version, exc)

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
