"""Background cache chores: idle-TTL unloading and daily scheduled warm-ups."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from loraserve.scheduler.tiers import AdapterTiers

log = logging.getLogger(__name__)


def next_occurrence(now: dt.datetime, hour: int, minute: int) -> dt.datetime:
    """The next time of day hour:minute strictly after `now`."""
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return at if at > now else at + dt.timedelta(days=1)


async def sweep_idle_forever(tiers: AdapterTiers, ttl_s: float) -> None:
    """Let go of adapters idle for `ttl_s`, checking a few times per TTL."""
    while True:
        await asyncio.sleep(min(max(ttl_s / 4, 0.05), 60.0))
        for adapter in await tiers.sweep_idle(ttl_s):
            log.info("unloaded idle adapter %s@%s", adapter.id, adapter.version)


@dataclass(frozen=True)
class WarmAt:
    """A daily warm-up: attach `adapter_id` at hour:minute, local time."""

    hour: int
    minute: int
    adapter_id: str


async def warm_daily(schedule: Sequence[WarmAt], warm: Callable[[str], Awaitable[None]],
                     now: Callable[[], dt.datetime] = dt.datetime.now) -> None:
    """Run warm(adapter_id) at each WarmAt every day."""
    while True:
        current = now()
        when, adapter_id = min((next_occurrence(current, w.hour, w.minute), w.adapter_id) for w in schedule)
        await asyncio.sleep((when - current).total_seconds())
        try:
            await warm(adapter_id)
            log.info("scheduled warm-up of %s done", adapter_id)
        except Exception as exc:  # a failed warm-up must not stop later ones
            log.warning("scheduled warm-up of %s failed: %s", adapter_id, exc)
