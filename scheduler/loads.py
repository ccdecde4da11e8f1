"""Cold-load limiting: at most N adapter loads at once, one load per adapter however many ask."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger(__name__)


class LoadLimiter(Generic[K, V]):
    """Single-flight loads behind a semaphore.

    Asking for a key already loading joins that load; otherwise a new load
    waits for one of `max_concurrent` slots. A caller that gives up (is
    cancelled) does not cancel a load others may be waiting on.
    """

    def __init__(self, load: Callable[[K], Awaitable[V]], max_concurrent: int = 2):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._load = load
        self._slots = asyncio.Semaphore(max_concurrent)
        self._inflight: dict[K, asyncio.Task] = {}
        self.running = 0
        self.peak = 0
        self.started = 0

    def loading(self, key: K) -> bool:
        return key in self._inflight

    async def get(self, key: K) -> V:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._run(key))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task) -> None:
        self._inflight.pop(key, None)
        # Retrieved here: when every caller gave up, nobody else would, and asyncio would report the
        # error as never retrieved when the task is collected.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("read of %s failed: %s", key, exc)

    async def _run(self, key: K) -> V:
        async with self._slots:
            self.started += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                return await self._load(key)
            finally:
                self.running -= 1
