"""Tiered adapter cache bookkeeping: byte budgets per tier, LRU, pins, in-use protection.

Tiers are exclusive: an adapter's weights live in exactly one of DISK (the
store), RAM (host tensors) or VRAM (attached to the model on the compute
device). Moving up costs a read or an attach; budgets cap RAM and VRAM bytes.

`plan_admit` is the policy, a pure function: given the entries, the budgets and
what must not be touched, it returns the actions that make room, or raises
NoRoom. AdapterCache only records state and counts; the coordinator in
scheduler/tiers.py carries the actions out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from loraserve.scheduler.errors import NoCacheRoom
from loraserve.scheduler.types import AdapterRef, Tier


@dataclass
class Entry:
    adapter: AdapterRef
    tier: Tier
    bytes: int
    last_used: float
    pinned: bool = False
    used: bool = False
    host_bytes: int = 0
    """While attached: its size as a RAM copy (a demotion's cost to the RAM tier); `bytes` is
    then what it occupies on the device."""
    """Whether a request has used it (else last_used is when it was loaded)."""


@dataclass(frozen=True)
class Budgets:
    ram: int
    vram: int

    def of(self, tier: Tier) -> int:
        return self.ram if tier is Tier.RAM else self.vram


@dataclass(frozen=True)
class Occupancy:
    """What one tier holds."""

    bytes: int
    adapters: int


@dataclass(frozen=True)
class Demote:
    """VRAM -> RAM."""

    adapter: AdapterRef


@dataclass(frozen=True)
class Drop:
    """RAM or VRAM -> DISK (the weights are let go; the store still has them)."""

    adapter: AdapterRef
    tier: Tier


Action = Demote | Drop


class NoRoom(NoCacheRoom):
    """The tier is full of pinned or in-use adapters (RESOURCE_EXHAUSTED, CACHE_FULL, when it
    reaches a caller; the scheduler instead waits for rows to leave)."""

    def __init__(self, tier: Tier, needed: int, budget: int, adapter: AdapterRef):
        super().__init__(f"{tier.name} budget of {budget} bytes cannot make room for {needed} more bytes: "
                         "the rest is pinned or in use", adapter_id=adapter.key)
        self.tier, self.needed, self.budget = tier, needed, budget


def usage(entries: Iterable[Entry], tier: Tier) -> int:
    return sum(e.bytes for e in entries if e.tier is tier)


def plan_admit(entries: Mapping[AdapterRef, Entry], budgets: Budgets, adapter: AdapterRef, size: int, tier: Tier,
               protected: frozenset[AdapterRef]) -> list[Action]:
    """Actions that make room for `adapter` (`size` bytes) in `tier` (RAM or VRAM).

    Victims are the least recently used entries of that tier that are neither
    pinned nor protected. Adapters pushed out of VRAM go down to RAM when RAM
    has room, or can make it from entries older than them; otherwise to disk.
    """
    if size > budgets.of(tier):
        raise NoRoom(tier, size, budgets.of(tier), adapter)
    current = entries.get(adapter)
    moving_out = current.bytes if current is not None and current.tier is not Tier.DISK else 0
    untouchable = protected | {adapter}

    def victims(t: Tier) -> list[Entry]:
        return sorted((e for e in entries.values() if e.tier is t and not e.pinned and e.adapter not in untouchable),
                      key=lambda e: e.last_used)

    def take(candidates: list[Entry], need: int) -> list[Entry]:
        chosen, freed = [], 0
        for e in candidates:
            if freed >= need:
                break
            chosen.append(e)
            freed += e.bytes
        return chosen if freed >= need else []

    values = entries.values()
    if tier is Tier.RAM:
        need = usage(values, Tier.RAM) - (moving_out if current and current.tier is Tier.RAM else 0) \
            + size - budgets.ram
        if need <= 0:
            return []
        chosen = take(victims(Tier.RAM), need)
        if not chosen:
            raise NoRoom(Tier.RAM, size, budgets.ram, adapter)
        return [Drop(e.adapter, Tier.RAM) for e in chosen]

    need = usage(values, Tier.VRAM) + size - budgets.vram
    demoted = take(victims(Tier.VRAM), need) if need > 0 else []
    if need > 0 and not demoted:
        raise NoRoom(Tier.VRAM, size, budgets.vram, adapter)
    actions: list[Action] = []
    # `adapter` keeps its RAM copy until the attach is done (the engine lets go of it after), so a
    # demoted victim's copy must fit beside it: then neither memory nor the books ever hold more
    # than the RAM budget, even while the demotions and the attach run.
    ram_used = usage(values, Tier.RAM)
    ram_victims = victims(Tier.RAM)
    # Most recently used first, so they are the ones that keep a RAM copy.
    for e in sorted(demoted, key=lambda e: e.last_used, reverse=True):
        host = e.host_bytes or e.bytes
        while ram_used + host > budgets.ram and ram_victims and ram_victims[0].last_used < e.last_used:
            old = ram_victims.pop(0)
            actions.append(Drop(old.adapter, Tier.RAM))
            ram_used -= old.bytes
        if ram_used + host <= budgets.ram:
            actions.append(Demote(e.adapter))
            ram_used += host
        else:
            actions.append(Drop(e.adapter, Tier.VRAM))
    return actions


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


@dataclass
class AdapterCache:
    """The recorded state: which adapter is in which tier, how big, how recently used."""

    budgets: Budgets
    entries: dict[AdapterRef, Entry] = field(default_factory=dict)
    stats: dict[Tier, TierStats] = field(default_factory=lambda: {Tier.RAM: TierStats(), Tier.VRAM: TierStats()})
    occupancy: dict[Tier, Occupancy] = field(init=False)
    """RAM and VRAM, replaced whole after each change: what readers on other threads (the metrics
    endpoint) take, since entries change field by field on the event loop."""

    def __post_init__(self):
        self._recount()

    def _recount(self) -> None:
        held = {t: [e for e in self.entries.values() if e.tier is t] for t in (Tier.RAM, Tier.VRAM)}
        self.occupancy = {t: Occupancy(sum(e.bytes for e in es), len(es)) for t, es in held.items()}

    def tier_of(self, adapter: AdapterRef) -> Tier:
        e = self.entries.get(adapter)
        return e.tier if e else Tier.DISK

    def used(self, tier: Tier) -> int:
        return usage(self.entries.values(), tier)

    def plan(self, adapter: AdapterRef, size: int, tier: Tier, protected: frozenset[AdapterRef]) -> list[Action]:
        return plan_admit(self.entries, self.budgets, adapter, size, tier, protected)

    def place(self, adapter: AdapterRef, tier: Tier, size: int, now: float) -> None:
        """Record `adapter` as now in `tier` (a load, an attach, or a reservation before a read)."""
        e = self.entries.get(adapter)
        if e is None:
            self.entries[adapter] = Entry(adapter, tier, size, now)
        else:
            e.tier, e.bytes, e.last_used = tier, size, now
        self.stats[tier].loads += 1
        self._recount()

    def resize(self, adapter: AdapterRef, size: int) -> None:
        """What a read really holds, once it is done (never more than it reserved)."""
        self.entries[adapter].bytes = size
        self._recount()

    def apply(self, action: Action) -> None:
        e = self.entries[action.adapter]
        if isinstance(action, Demote):
            e.tier, e.bytes = Tier.RAM, e.host_bytes or e.bytes
            self.stats[Tier.VRAM].evictions += 1
        else:
            self.stats[action.tier].evictions += 1
            if e.pinned:
                e.tier = Tier.DISK
            else:
                del self.entries[action.adapter]
        self._recount()

    def forget(self, adapter: AdapterRef) -> None:
        """A reservation whose read failed."""
        e = self.entries.get(adapter)
        if e is not None and not e.pinned:
            del self.entries[adapter]
        elif e is not None:
            e.tier = Tier.DISK
        self._recount()

    def record_use(self, adapter: AdapterRef, found_in: Tier, now: float) -> None:
        """Count one request's hit or miss per tier (`found_in`: where its adapter was when it
        was needed), and refresh the adapter's recency."""
        vram, ram = self.stats[Tier.VRAM], self.stats[Tier.RAM]
        if found_in is Tier.VRAM:
            vram.hits += 1
        else:
            vram.misses += 1
            if found_in is Tier.RAM:
                ram.hits += 1
            else:
                ram.misses += 1
        if adapter in self.entries:
            self.entries[adapter].last_used = now
            self.entries[adapter].used = True
