"""Adapters read for waiting requests while the batch runs: each cold adapter a queued request
needs is read from disk (fetched from the origin first if it must be) into RAM through
AdapterTiers, so that only the attach is left when its requests are admitted. A read that fails
fails (or moves to the base model) the requests waiting for it, and so does every request for
that adapter submitted within the backoff, without reading it again."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from loraserve.scheduler.batch import Batch
from loraserve.scheduler.cache import NoRoom, Tier
from loraserve.scheduler.completion import Completions
from loraserve.scheduler.errors import LoraServeError
from loraserve.scheduler.observer import Observer
from loraserve.scheduler.tiers import AdapterTiers, Fetch
from loraserve.scheduler.types import AdapterRef


@dataclass(frozen=True)
class ColdRead:
    """A read from disk made while its requests waited."""

    started: float
    ms: float
    fetched: Fetch | None
    """The remote download it waited for, if any."""


@dataclass(frozen=True)
class FailedRead:
    at: float
    error: LoraServeError
    """Unreadable, or not the weights that were registered."""


class ReadAhead:
    """`woke`: called when a read ends, whatever its outcome: the loop has news."""

    def __init__(self, tiers: AdapterTiers, batch: Batch, completions: Completions, observer: Observer,
                 clock: Callable[[], float], backoff_s: float, woke: Callable[[], None]):
        self._tiers = tiers
        self._batch = batch
        self._completions = completions
        self._observer = observer
        self._clock = clock
        self._backoff_s = backoff_s
        self._woke = woke
        self._reading: set[AdapterRef] = set()
        self._cold: dict[AdapterRef, ColdRead] = {}
        self._failed: dict[AdapterRef, FailedRead] = {}

    def ready(self, adapter: AdapterRef) -> bool:
        """In RAM or VRAM, and no move of it under way: admitting its requests costs an attach at most."""
        return self._tiers.tier_of(adapter) >= Tier.RAM and not self._tiers.loads.loading(adapter)

    def failed_recently(self, adapter: AdapterRef) -> LoraServeError | None:
        """Why `adapter`'s last read failed, if that was within the backoff."""
        failed = self._failed.get(adapter)
        if failed and self._clock() - failed.at < self._backoff_s:
            return failed.error
        return None

    def take(self, adapter: AdapterRef) -> ColdRead | None:
        """The read made for `adapter` while its requests waited, once (they are being admitted)."""
        return self._cold.pop(adapter, None)

    def start(self) -> None:
        """A read for every adapter the queue waits for that is neither ready, nor being read, nor
        waiting for room."""
        for adapter in dict.fromkeys(s.req.adapter for s in self._batch.waiting):
            if adapter not in self._reading | self._batch.deferred and not self.ready(adapter):
                self._reading.add(adapter)
                asyncio.get_running_loop().create_task(self._read(adapter))

    async def _read(self, adapter: AdapterRef) -> None:
        started = self._clock()
        try:
            moved = await self._tiers.to_ram(adapter)
            if moved.found_in is Tier.DISK:
                self._cold[adapter] = ColdRead(started, moved.ms, moved.fetched)
                self._observer.adapter_read(adapter, moved.ms)
        except NoRoom:
            self._batch.deferred.add(adapter)
        except LoraServeError as exc:  # unreadable, or not the weights that were registered
            self._failed[adapter] = FailedRead(self._clock(), exc)
            self._completions.fail_or_fallback([s for s in self._batch.waiting if s.req.adapter == adapter], exc)
        finally:
            self._reading.discard(adapter)
            self._woke()
