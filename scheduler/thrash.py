"""Spot an adapter that keeps being reloaded: a cache too small for the traffic."""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from typing import Hashable


class ThrashDetector:
    """True from `record` when `key` has now been loaded more than `limit` times within `window_s`."""

    def __init__(self, limit: int, window_s: float = 3600.0):
        self.limit, self.window_s = limit, window_s
        self._loads: dict[Hashable, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()  # loads are recorded on the event loop, counted by the scrape thread

    def record(self, key: Hashable, now: float) -> bool:
        with self._lock:
            loads = self._loads[key]
            loads.append(now)
            self._expire(loads, now)
            return len(loads) > self.limit

    def over_limit(self, now: float) -> int:
        """How many keys are over the limit within the window ending `now` (keys with no load
        left in it are forgotten)."""
        with self._lock:
            for key in list(self._loads):
                self._expire(self._loads[key], now)
                if not self._loads[key]:
                    del self._loads[key]
            return sum(1 for loads in self._loads.values() if len(loads) > self.limit)

    def _expire(self, loads: deque[float], now: float) -> None:
        while loads and loads[0] <= now - self.window_s:
            loads.popleft()
