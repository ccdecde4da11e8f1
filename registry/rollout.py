"""Canary rollouts and shadows of an adapter version. A canary: a share of the requests that name
the adapter goes to the candidate version, the rest to the active one, until `promote` completes
it, `rollback` ends it, or the server aborts it on a breach of its limits. A shadow: a share of the
adapter's requests is also run, in the background, by the shadow version, whose answers are
compared with the served ones and never returned.

Both are facts about the version (its passport's `canary` and `shadow`), written by an index
write like status, so they are applied by hot reload from any store, local or S3, and a crash
leaves the old state or the new one. At most one version of an adapter has a running canary, and
at most one is shadowed.

Routing is a pure function (`routed`): per request by a fresh draw, or sticky per client by a hash
of (adapter, version, client) so one client sees one version for the whole canary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

from loraserve.registry.fields import from_known

KEYS = ("request", "client")


class CanaryState(StrEnum):
    RUNNING = "running"
    """Routed to."""
    COMPLETED = "completed"
    """Promoted."""
    ENDED = "ended"
    """Rolled back, or superseded by hand."""
    ABORTED = "aborted"
    """By the server, its limits breached (`figures` says by what)."""


@dataclass
class Limits:
    """When the server aborts a canary: over the last `window_s` seconds, once the canary has
    served `min_requests`, its error rate is above `max_error_rate` and above the stable
    version's, or its time-to-first-token p95 is above `max_ttft_p95_ratio` times the stable's
    (which then also needs `min_requests`)."""

    max_error_rate: float = 0.05
    max_ttft_p95_ratio: float = 2.0
    min_requests: int = 20
    window_s: float = 300.0

    def __post_init__(self):
        problems = []
        if not _number(self.max_error_rate) or not 0 <= self.max_error_rate <= 1:
            problems.append("max_error_rate must be in [0, 1]")
        if not _number(self.max_ttft_p95_ratio) or self.max_ttft_p95_ratio < 1:
            problems.append("max_ttft_p95_ratio must be a number >= 1")
        if not isinstance(self.min_requests, int) or isinstance(self.min_requests, bool) or self.min_requests < 1:
            problems.append("min_requests must be a whole number >= 1")
        if not _number(self.window_s) or self.window_s <= 0:
            problems.append("window_s must be a number > 0")
        if problems:
            raise ValueError("canary limits: " + "; ".join(problems))


@dataclass
class Canary:
    percent: float
    started_at: str
    key: str = "request"
    state: CanaryState = CanaryState.RUNNING
    limits: Limits = field(default_factory=Limits)
    ended_at: str = ""
    reason: str = ""
    """Why it ended (aborted: the breach)."""
    figures: dict = field(default_factory=dict)
    """Aborted: the canary's and the stable version's figures over the window that tripped it."""

    def __post_init__(self):
        if isinstance(self.limits, dict):
            self.limits = from_known(Limits, self.limits, "canary limits")
        problems = []
        if not _number(self.percent) or not 0 < self.percent < 100:
            problems.append("percent must be between 0 and 100 (exclusive)")
        if self.key not in KEYS:
            problems.append(f"key must be one of {KEYS}")
        if self.state in tuple(CanaryState):
            self.state = CanaryState(self.state)
        else:
            problems.append(f"state must be one of {tuple(s.value for s in CanaryState)}")
        if not isinstance(self.figures, dict):
            problems.append("figures must be an object")
        for name in ("started_at", "ended_at", "reason"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be text")
        if problems:
            raise ValueError("canary: " + "; ".join(problems))

    @property
    def running(self) -> bool:
        return self.state == CanaryState.RUNNING

    @classmethod
    def from_dict(cls, data) -> Canary:
        return from_known(cls, data, "canary")


@dataclass
class Shadow:
    percent: float
    started_at: str

    def __post_init__(self):
        if not _number(self.percent) or not 0 < self.percent <= 100:
            raise ValueError("shadow: percent must be in (0, 100]")
        if not isinstance(self.started_at, str):
            raise ValueError("shadow: started_at must be text")

    @classmethod
    def from_dict(cls, data) -> Shadow:
        if not isinstance(data, dict) or set(data) != {"percent", "started_at"}:
            raise ValueError("shadow must be an object with percent and started_at")
        return cls(**data)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def routed(canary: Canary, key: str, client: str | None, draw: float) -> bool:
    """Whether this request goes to the canary: `key` is "adapter@version" of the canary, `draw`
    a uniform number in [0, 100) for per-request splits; a sticky split ignores it and places the
    client by a hash, the same on every replica."""
    if canary.key == "client":
        digest = hashlib.sha256(f"{key}\0{client or ''}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2 ** 64 * 100
    return draw < canary.percent
