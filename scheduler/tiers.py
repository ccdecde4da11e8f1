"""Moves adapters between tiers through the engine, keeping AdapterCache's books.

Reads from disk go through a LoadLimiter (at most N at once, one per adapter)
and overlap compute. Every move (attach, demote, detach, drop, and the books'
reservation for a read) runs under one lock, so moves of an adapter never
interleave. The books never claim more residency than the engine has: an
upward move is recorded after the engine did it, a downward one before the
engine starts it. So "VRAM in the books" always means attached (a request may
use it at once), and the recorded bytes of a tier never exceed its budget:
room is made (and a read's bytes reserved) before anything grows, and an
attach's demotions are given RAM beside the adapter being attached, which holds
its RAM copy until the attach is done.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Protocol, TypeVar

from loraserve.scheduler.cache import Action, AdapterCache, Budgets, Demote, Drop, NoRoom, Tier, TierStats
from loraserve.scheduler.errors import AdapterBusy, AdapterLoadFailed
from loraserve.scheduler.loads import LoadLimiter
from loraserve.scheduler.types import AdapterRef

T = TypeVar("T")


class TierEngine(Protocol):
    """The moves an engine performs; the bookkeeping is all here."""

    def bytes_once_read(self, adapter: AdapterRef) -> int:
        """The adapter's bytes once read into RAM, in the dtype it is held in (raises if it
        cannot be read): the RAM tier reserves exactly this before the read."""

    def attached_bytes(self, adapter: AdapterRef) -> int:
        """Device bytes the adapter occupies once attached (what the VRAM budget counts)."""

    async def fetch(self, adapter: AdapterRef) -> int:
        """DISK -> RAM; returns the bytes now held."""

    async def attach(self, adapter: AdapterRef) -> None:
        """RAM -> VRAM."""

    async def demote(self, adapter: AdapterRef) -> None:
        """VRAM -> RAM."""

    async def detach(self, adapter: AdapterRef) -> None:
        """VRAM -> DISK."""

    def drop(self, adapter: AdapterRef) -> None:
        """RAM -> DISK."""


class Fetch(Protocol):
    """A download from the remote origin that a read waited for (the store's own record of it)."""

    @property
    def bytes(self) -> int: ...

    @property
    def seconds(self) -> float: ...


class Origin(Protocol):
    """Where adapters' files come from when the store is remote: before a read, `local(adapter)`
    makes sure its directory (adapter.path) holds them, fetching them if needed (the Fetch, or
    None when they were already on disk), and keeps them there until the block ends."""

    def local(self, adapter: AdapterRef) -> AbstractAsyncContextManager[Fetch | None]: ...


@dataclass(frozen=True)
class Moved:
    """What making an adapter usable took: where it was found and the milliseconds spent."""

    found_in: Tier
    ms: float
    fetched: Fetch | None = None
    """The remote fetch the read included (it is counted in `ms`)."""


@dataclass(frozen=True)
class AdapterState:
    """One adapter as the tiers hold it, copied out: what the admin API and metrics read."""

    adapter: AdapterRef
    tier: Tier
    bytes: int
    """What it occupies in its tier (device bytes while attached); 0 on disk."""
    pinned: bool = False
    in_use: bool = False
    """Queued or running requests need it."""
    idle_s: float | None = None
    """Seconds since a request last used it; None if none has yet."""


@dataclass(frozen=True)
class TierState:
    """One tier's counters (since start-up) and occupancy, copied out."""

    tier: Tier
    stats: TierStats
    bytes_used: int
    budget: int
    adapters: int


def _never() -> frozenset[AdapterRef]:
    return frozenset()


class AdapterTiers:
    def __init__(self, engine: TierEngine, budgets: Budgets, *, max_loads: int = 2,
                 running: Callable[[], frozenset[AdapterRef]] = _never,
                 waiting: Callable[[], frozenset[AdapterRef]] = _never,
                 clock: Callable[[], float] = time.monotonic, origin: Origin | None = None):
        self.cache = AdapterCache(budgets)
        # A remote fetch is part of its read: it takes one of the same max_loads slots, once per adapter.
        self.loads: LoadLimiter[AdapterRef, Moved] = LoadLimiter(self._read, max_loads)
        self._origin = origin
        self._engine = engine
        self._moves = asyncio.Lock()
        self._running, self._waiting = running, waiting
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def tier_of(self, adapter: AdapterRef) -> Tier:
        return Tier.VRAM if adapter.is_base else self.cache.tier_of(adapter)

    def _loading(self) -> frozenset[AdapterRef]:
        return frozenset(a for a in self.cache.entries if self.loads.loading(a))

    # -- reading: the one door for code outside the scheduler (admin API, metrics) -------------
    def state(self, adapter: AdapterRef) -> AdapterState:
        """Where `adapter` is now (DISK with no other facts when the tiers do not hold it)."""
        return self._state(adapter, self._running() | self._waiting(), self._clock())

    def adapter_states(self) -> list[AdapterState]:
        """Every adapter the tiers hold, pinned ones pushed back to disk included."""
        busy, now = self._running() | self._waiting(), self._clock()
        return [self._state(a, busy, now) for a in self.cache.entries]

    def tier_states(self) -> dict[Tier, TierState]:
        """RAM and VRAM; safe from another thread (the metrics endpoint reads the occupancy the
        books last published whole, never an entry half-moved)."""
        cache, occupancy = self.cache, self.cache.occupancy
        return {t: TierState(t, replace(cache.stats[t]), occupancy[t].bytes, cache.budgets.of(t), occupancy[t].adapters)
                for t in (Tier.RAM, Tier.VRAM)}

    def _state(self, adapter: AdapterRef, busy: frozenset[AdapterRef], now: float) -> AdapterState:
        if adapter.is_base:
            return AdapterState(adapter, Tier.VRAM, 0, in_use=adapter in busy)
        e = self.cache.entries.get(adapter)
        if e is None:
            return AdapterState(adapter, Tier.DISK, 0, in_use=adapter in busy)
        return AdapterState(adapter, e.tier, e.bytes if e.tier > Tier.DISK else 0, e.pinned, adapter in busy,
                            now - e.last_used if e.used else None)

    # -- up --------------------------------------------------------------------
    async def to_ram(self, adapter: AdapterRef) -> Moved:
        """Make sure `adapter` is at least in RAM (joining a read already under way)."""
        tier = self.tier_of(adapter)
        if tier >= Tier.RAM and not self.loads.loading(adapter):
            return Moved(tier, 0.0)
        return await self.loads.get(adapter)

    async def _read(self, adapter: AdapterRef) -> Moved:
        if self._origin is None:
            return Moved(Tier.DISK, await self._read_local(adapter))
        started = time.perf_counter()
        async with self._origin.local(adapter) as fetched:
            await self._read_local(adapter)
        return Moved(Tier.DISK, (time.perf_counter() - started) * 1e3, fetched)

    async def _read_local(self, adapter: AdapterRef) -> float:
        started = time.perf_counter()
        try:
            size = self._engine.bytes_once_read(adapter)
        except Exception as exc:
            raise AdapterLoadFailed(adapter.key, f"{type(exc).__name__}: {exc}") from exc
        self._check_fits(adapter, size, Tier.RAM)
        async with self._moves:
            if self.tier_of(adapter) >= Tier.RAM:
                return 0.0
            # Prefetching must not push out what queued requests are about to use.
            protected = self._running() | self._waiting() | self._loading()
            await self._execute(self.cache.plan(adapter, size, Tier.RAM, protected))
            self.cache.place(adapter, Tier.RAM, size, self._clock())  # reserve before reading
        try:
            held = await self._engine.fetch(adapter)
        except BaseException:
            async with self._moves:
                self.cache.forget(adapter)
            raise
        self.cache.resize(adapter, min(held, size))
        return (time.perf_counter() - started) * 1e3

    async def to_vram(self, adapter: AdapterRef) -> Moved:
        """Attach `adapter` to the model, reading it first if needed."""
        started = time.perf_counter()
        found_in = self.tier_of(adapter)
        while self.tier_of(adapter) is not Tier.VRAM:
            moved = await self.to_ram(adapter)
            found_in = min(found_in, moved.found_in)
            if await self._locked(self._attach, adapter):
                break
        return Moved(found_in, (time.perf_counter() - started) * 1e3 if found_in < Tier.VRAM else 0.0)

    async def _attach(self, adapter: AdapterRef) -> bool:
        """Whether `adapter` is attached now (False: pushed back to disk before we got the lock).
        The caller returns on this answer, not on the books after the lock is let go, which a
        move waiting for the lock may already have changed."""
        if self.tier_of(adapter) is not Tier.RAM:
            return self.tier_of(adapter) is Tier.VRAM
        host, size = self.cache.entries[adapter].bytes, self._engine.attached_bytes(adapter)
        self._check_fits(adapter, size, Tier.VRAM)
        protected = self._running() | self._loading()
        await self._execute(self.cache.plan(adapter, size, Tier.VRAM, protected))
        await self._engine.attach(adapter)
        self.cache.place(adapter, Tier.VRAM, size, self._clock())
        self.cache.entries[adapter].host_bytes = host
        return True

    async def _locked(self, move: Callable[..., Awaitable[T]], *args) -> T:
        """Run `move` under the moves lock, to its end even if the caller is cancelled (a gRPC
        admin call's deadline): an engine move outlives its caller on the engine's thread, so
        a move cut between the engine's step and the books' would leave them out of step."""
        async def locked() -> T:
            async with self._moves:
                return await move(*args)

        return await asyncio.shield(asyncio.get_running_loop().create_task(locked()))

    def _check_fits(self, adapter: AdapterRef, size: int, tier: Tier) -> None:
        budget = self.cache.budgets.of(tier)
        if size > budget:
            raise AdapterLoadFailed(adapter.key, f"it needs {size} bytes; the whole {tier.name} budget is {budget}")

    # -- down ------------------------------------------------------------------
    async def _execute(self, actions: list[Action]) -> None:
        """Downward moves. The books change first, for the whole plan before the engine's first
        move: whoever reads them while the engine still works (a request's to_vram, the
        scheduler's readiness check) sees every victim already gone and waits on the lock,
        instead of trusting a slot that a later move of the plan empties (the plan protected only
        the adapters in use when it was made)."""
        for action in actions:
            self.cache.apply(action)
        for action in actions:
            if isinstance(action, Demote):
                await self._engine.demote(action.adapter)
            elif action.tier is Tier.VRAM:
                await self._engine.detach(action.adapter)
            else:
                self._engine.drop(action.adapter)

    async def evict(self, adapter: AdapterRef, to: Tier) -> None:
        """Move `adapter` down to `to` (RAM or DISK); refused while pinned or in use."""
        await self._locked(self._evict, adapter, to)

    async def _evict(self, adapter: AdapterRef, to: Tier) -> None:
        entry = self.cache.entries.get(adapter)
        if entry is None or entry.tier <= to:
            return
        if entry.pinned:
            raise AdapterBusy(adapter.key, "it is pinned; unpin it first")
        if adapter in self._running() | self._waiting() | self._loading():
            raise AdapterBusy(adapter.key, "requests are using it")
        if to is Tier.RAM:
            others = self._running() | self._waiting() | self._loading()
            actions = [a for a in self.cache.plan(adapter, entry.host_bytes or entry.bytes, Tier.RAM, others)]
            await self._execute([*actions, Demote(adapter)])
        else:
            await self._execute([Drop(adapter, entry.tier)])

    async def sweep_idle(self, ttl_s: float) -> list[AdapterRef]:
        """Let go of unpinned adapters unused for `ttl_s` seconds; returns them."""
        return await self._locked(self._sweep, ttl_s)

    async def _sweep(self, ttl_s: float) -> list[AdapterRef]:
        # Who is busy is read under the lock: while it was awaited, requests may have started.
        now, busy = self._clock(), self._running() | self._waiting() | self._loading()
        idle = [e for e in self.cache.entries.values()
                if not e.pinned and e.tier > Tier.DISK and e.adapter not in busy and now - e.last_used >= ttl_s]
        await self._execute([Drop(e.adapter, e.tier) for e in idle])
        return [e.adapter for e in idle]

    # -- pins ------------------------------------------------------------------
    async def pin(self, adapter: AdapterRef) -> None:
        """Attach `adapter` and keep it attached until unpinned."""
        if adapter.is_base:
            return
        while True:
            await self.to_vram(adapter)
            async with self._moves:
                if self.tier_of(adapter) is Tier.VRAM:
                    self.cache.entries[adapter].pinned = True
                    return

    def unpin(self, adapter: AdapterRef) -> None:
        entry = self.cache.entries.get(adapter)
        if entry is not None:
            entry.pinned = False
            if entry.tier is Tier.DISK:
                del self.cache.entries[adapter]

    def record_use(self, adapter: AdapterRef, found_in: Tier) -> None:
        if not adapter.is_base:
            self.cache.record_use(adapter, found_in, self._clock())


__all__ = ["AdapterState", "AdapterTiers", "Moved", "NoRoom", "TierEngine", "TierState"]
