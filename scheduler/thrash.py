"""Spot an adapter that keeps being reloaded: a cache too small for the traffic."""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Hashable


class ThrashDetector:
    """True from `record` when `key` has now been loaded more than `limit` times within `window_s`."""

    def __init__(self, limit: int, window_s: float = 3600.0):
        self.limit, self.window_s = limit, window_s
        self._loads: dict[Hashable, deque[float]] = defaultdict(deque)

    def record(self, key: Hashable, now: float) -> bool:
        loads = self._loads[key]
        loads.append(now)
        while loads and loads[0] <= now - self.window_s:
            loads.popleft()
        return len(loads) > self.limit
