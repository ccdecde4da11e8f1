"""The tier policy (pure) and AdapterTiers under random pressure, against a recording engine."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest
from fakes import WeightsRecorder

from loraserve.scheduler.cache import Budgets, Demote, Drop, Entry, NoRoom, Tier, plan_admit
from loraserve.scheduler.errors import LoraServeError
from loraserve.scheduler.housekeeping import next_occurrence
from loraserve.scheduler.tiers import AdapterTiers
from loraserve.scheduler.types import AdapterRef


def ref(name: str, version: str = "1") -> AdapterRef:
    return AdapterRef(name, version, f"/store/{name}")


def entries(*specs) -> dict:
    """specs: (name, tier, bytes, last_used[, pinned])"""
    return {ref(n): Entry(ref(n), t, b, u, *rest) for n, t, b, u, *rest in specs}


NONE = frozenset()


def test_ram_admission_drops_least_recently_used_first():
    state = entries(("a", Tier.RAM, 40, 1.0), ("b", Tier.RAM, 40, 2.0), ("c", Tier.RAM, 10, 0.5))
    assert plan_admit(state, Budgets(100, 100), ref("new"), 30, Tier.RAM, NONE) == \
        [Drop(ref("c"), Tier.RAM), Drop(ref("a"), Tier.RAM)]
    assert plan_admit(state, Budgets(200, 100), ref("new"), 30, Tier.RAM, NONE) == []


def test_pinned_and_protected_entries_are_never_victims():
    state = entries(("a", Tier.VRAM, 50, 1.0, True), ("b", Tier.VRAM, 50, 2.0), ("c", Tier.RAM, 10, 0.0))
    with pytest.raises(NoRoom):
        plan_admit(state, Budgets(100, 100), ref("c"), 10, Tier.VRAM, frozenset({ref("b")}))
    assert plan_admit(state, Budgets(100, 100), ref("c"), 10, Tier.VRAM, NONE) == [Demote(ref("b"))]


def test_vram_victims_go_down_to_ram_when_it_has_room_else_to_disk():
    def state(r_used):
        return entries(("v1", Tier.VRAM, 30, 1.0), ("v2", Tier.VRAM, 30, 2.0), ("r", Tier.RAM, 50, r_used),
                       ("new", Tier.RAM, 50, 3.0))

    # Both VRAM entries must go. RAM (budget 130) keeps r and new (100) until new is attached: room
    # for one. v2, the more recent, is demoted; v1 is older than r, cannot push it out, and goes to disk.
    assert plan_admit(state(1.5), Budgets(130, 60), ref("new"), 50, Tier.VRAM, NONE) == \
        [Demote(ref("v2")), Drop(ref("v1"), Tier.VRAM)]
    # When r is older than both, it is the one let go.
    assert plan_admit(state(0.5), Budgets(130, 60), ref("new"), 50, Tier.VRAM, NONE) == \
        [Demote(ref("v2")), Drop(ref("r"), Tier.RAM), Demote(ref("v1"))]


def test_an_attachs_demotion_gets_ram_beside_the_adapter_still_being_attached():
    """The issue's 8 adapters where 7 fit: `new`'s RAM copy lives until its attach is done, so the
    victim's copy cannot count on its room (the plan used to count it as gone already)."""
    def state(r_used):
        return entries(("v", Tier.VRAM, 30, 1.0), ("r", Tier.RAM, 20, r_used), ("new", Tier.RAM, 50, 3.0))

    assert plan_admit(state(0.5), Budgets(100, 30), ref("new"), 30, Tier.VRAM, NONE) == [Demote(ref("v"))]
    assert plan_admit(state(0.5), Budgets(90, 30), ref("new"), 30, Tier.VRAM, NONE) == \
        [Drop(ref("r"), Tier.RAM), Demote(ref("v"))]
    assert plan_admit(state(2.0), Budgets(90, 30), ref("new"), 30, Tier.VRAM, NONE) == [Drop(ref("v"), Tier.VRAM)]


def test_an_adapter_larger_than_the_budget_never_fits():
    with pytest.raises(NoRoom):
        plan_admit({}, Budgets(100, 10), ref("big"), 11, Tier.VRAM, NONE)


def test_next_occurrence_is_today_or_tomorrow():
    now = dt.datetime(2026, 11, 22, 8, 0)
    assert next_occurrence(now, 8, 55) == dt.datetime(2026, 11, 22, 8, 55)
    assert next_occurrence(now, 7, 0) == dt.datetime(2026, 11, 23, 7, 0)
    assert next_occurrence(now, 8, 0) == dt.datetime(2026, 11, 23, 8, 0)


def test_warm_daily_fires_at_the_scheduled_minute():
    from loraserve.scheduler.housekeeping import WarmAt, warm_daily

    start = dt.datetime(2026, 11, 22, 8, 54, 59, 950000)  # 50 ms before 08:55
    warmed: list[str] = []

    async def warm(adapter_id):
        warmed.append(adapter_id)

    async def scenario():
        task = asyncio.create_task(warm_daily([WarmAt(8, 55, "support"), WarmAt(9, 30, "legal")], warm, now=lambda: start))
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(scenario())
    assert warmed[:1] == ["support"]


class RecordingEngine(WeightsRecorder):
    """Reads succeed at once, with per-adapter sizes."""

    def __init__(self, sizes: dict[AdapterRef, int]):
        super().__init__()
        self.sizes = sizes
        self.reads = 0

    def bytes_once_read(self, adapter):
        return self.sizes[adapter]

    async def fetch(self, adapter):
        self.reads += 1
        await asyncio.sleep(0)
        self.ram.add(adapter)
        return self.sizes[adapter]


def test_random_operations_never_exceed_budgets_nor_touch_pinned_or_running():
    rng = random.Random(42)
    adapters = [ref(f"a{i}") for i in range(12)]
    engine = RecordingEngine({a: rng.randint(5, 40) for a in adapters})
    budgets = Budgets(ram=100, vram=80)
    running: set[AdapterRef] = set()
    clock = iter(range(1, 10**9))
    tiers = AdapterTiers(engine, budgets, running=lambda: frozenset(running), clock=lambda: next(clock))

    def check():
        cache = tiers.cache
        assert cache.used(Tier.RAM) <= budgets.ram and cache.used(Tier.VRAM) <= budgets.vram
        assert engine.vram == {a for a, e in cache.entries.items() if e.tier is Tier.VRAM}
        assert engine.ram == {a for a, e in cache.entries.items() if e.tier is Tier.RAM}
        for a, e in cache.entries.items():
            if e.pinned:
                assert e.tier is Tier.VRAM, f"pinned {a.id} left VRAM"
        for a in running:
            assert tiers.tier_of(a) is Tier.VRAM, f"running {a.id} left VRAM"

    async def scenario():
        ops = 0
        for _ in range(1500):
            a = rng.choice(adapters)
            op = rng.choice(["ram", "vram", "vram", "evict", "pin", "unpin", "run", "finish", "sweep"])
            try:
                if op == "ram":
                    await tiers.to_ram(a)
                elif op == "vram":
                    await tiers.to_vram(a)
                elif op == "evict":
                    if a not in running:
                        await tiers.evict(a, rng.choice([Tier.RAM, Tier.DISK]))
                elif op == "pin":
                    if sum(1 for e in tiers.cache.entries.values() if e.pinned) < 2:
                        await tiers.pin(a)
                elif op == "unpin":
                    tiers.unpin(a)
                elif op == "run" and len(running) < 2:
                    await tiers.to_vram(a)
                    running.add(a)
                elif op == "finish" and running:
                    running.discard(rng.choice(sorted(running, key=lambda r: r.id)))
                elif op == "sweep":
                    await tiers.sweep_idle(ttl_s=50)
            except NoRoom:
                pass  # pins and running adapters filled the tier: refused, not overrun
            except Exception as exc:
                if type(exc).__name__ != "AdapterBusy":
                    raise
            check()
            ops += 1
        return ops

    assert asyncio.run(scenario()) == 1500
    stats = tiers.cache.stats
    assert stats[Tier.VRAM].evictions > 50 and stats[Tier.RAM].evictions > 50


def test_concurrent_asks_for_one_cold_adapter_read_it_once():
    a = ref("x")
    engine = RecordingEngine({a: 10})
    tiers = AdapterTiers(engine, Budgets(100, 100))

    async def scenario():
        await asyncio.gather(*(tiers.to_vram(a) for _ in range(20)))

    asyncio.run(scenario())
    assert engine.reads == 1 and tiers.tier_of(a) is Tier.VRAM


class SlowMovesEngine(RecordingEngine):
    """Every move takes a while on the engine thread, as a real detach or demote does."""

    async def detach(self, adapter):
        await asyncio.sleep(0.002)
        await super().detach(adapter)

    async def demote(self, adapter):
        await asyncio.sleep(0.002)
        await super().demote(adapter)

    async def attach(self, adapter):
        await asyncio.sleep(0.002)
        await super().attach(adapter)


def test_evict_warm_pin_and_requests_interleaved_never_hand_out_a_detached_adapter():
    """One owner of residency: whenever to_vram returns, the engine really holds the adapter,
    however evictions, warm-ups, pins, unpins and idle sweeps of the same adapters interleave."""
    rng = random.Random(7)
    adapters = [ref(f"a{i}") for i in range(4)]
    engine = SlowMovesEngine({a: 10 for a in adapters})
    in_use: list[AdapterRef] = []  # like the scheduler's running rows: protected from eviction
    tiers = AdapterTiers(engine, Budgets(ram=30, vram=20), running=lambda: frozenset(in_use))
    handed_out = []

    async def request(a):
        in_use.append(a)
        try:
            await tiers.to_vram(a)
            await asyncio.sleep(0.003)  # the step that uses it runs a little later
            handed_out.append(a in engine.vram)
        except NoRoom:  # VRAM full of pinned adapters: refused, not handed out
            pass
        finally:
            in_use.remove(a)

    async def churn(a):
        op = rng.choice(["disk", "ram", "warm", "pin", "unpin", "sweep"])
        try:
            if op in ("disk", "ram"):
                await tiers.evict(a, Tier.DISK if op == "disk" else Tier.RAM)
            elif op == "warm":
                await tiers.to_vram(a)
            elif op == "pin":
                await tiers.pin(a)
            elif op == "unpin":
                tiers.unpin(a)
            else:
                await tiers.sweep_idle(0.0)
        except (NoRoom, LoraServeError):  # refusals (busy, full) are answers, not failures
            pass

    async def scenario():
        for _ in range(150):
            picks = [rng.choice(adapters) for _ in range(6)]
            await asyncio.gather(*(request(a) for a in picks[:3]), *(churn(a) for a in picks[3:]))
            tiers.unpin(picks[0])
            tiers.unpin(picks[3])

    asyncio.run(scenario())
    assert len(handed_out) > 300 and all(handed_out)
    assert engine.vram == {a for a, e in tiers.cache.entries.items() if e.tier is Tier.VRAM}
    assert engine.ram == {a for a, e in tiers.cache.entries.items() if e.tier is Tier.RAM}


def test_an_idle_sweep_waiting_for_the_lock_spares_an_adapter_a_request_took_meanwhile():
    a, b = ref("a"), ref("b")
    engine = SlowMovesEngine({a: 10, b: 10})
    in_use: list[AdapterRef] = []
    tiers = AdapterTiers(engine, Budgets(100, 100), running=lambda: frozenset(in_use))

    async def scenario():
        await tiers.to_vram(a)
        attaching = asyncio.create_task(tiers.to_vram(b))  # holds the lock through a slow attach
        await asyncio.sleep(0.001)
        sweep = asyncio.create_task(tiers.sweep_idle(0.0))
        await asyncio.sleep(0)  # the sweep now waits for the lock
        in_use.append(a)  # a request starts on `a`, already attached
        await tiers.to_vram(a)
        await attaching
        await sweep
        return a in engine.vram

    assert asyncio.run(scenario())


def test_the_read_api_copies_out_each_adapter_and_tier():
    a, b, c = ref("a"), ref("b"), ref("c")
    engine = RecordingEngine({a: 10, b: 20, c: 30})
    now = [0.0]
    tiers = AdapterTiers(engine, Budgets(ram=100, vram=100), waiting=lambda: frozenset({b}), clock=lambda: now[0])

    async def scenario():
        await tiers.to_vram(a)
        await tiers.to_ram(b)
        await tiers.pin(c)

    asyncio.run(scenario())
    tiers.record_use(a, Tier.DISK)
    now[0] = 5.0
    states = {s.adapter.id: s for s in tiers.adapter_states()}
    assert (states["a"].tier, states["a"].bytes, states["a"].idle_s, states["a"].in_use) == (Tier.VRAM, 10, 5.0, False)
    assert (states["b"].tier, states["b"].bytes, states["b"].idle_s, states["b"].in_use) == (Tier.RAM, 20, None, True)
    assert states["c"].pinned and tiers.state(c) == states["c"]
    assert tiers.state(ref("never")).tier is Tier.DISK and tiers.state(ref("never")).bytes == 0
    vram, ram = tiers.tier_states()[Tier.VRAM], tiers.tier_states()[Tier.RAM]
    assert (vram.adapters, vram.bytes_used, vram.budget, vram.stats.misses) == (2, 40, 100, 1)
    assert (ram.adapters, ram.bytes_used, ram.stats.misses) == (1, 20, 1)
    vram.stats.hits += 99  # a copy: the books are untouched
    assert tiers.tier_states()[Tier.VRAM].stats.hits == 0


def test_a_request_on_an_adapter_a_move_already_planned_to_evict_waits_and_finds_it_attached():
    """A warm-up that needs two slots plans both victims at once; while it demotes the first,
    requests start on both. The second victim must not still read as attached: its request
    would be handed a slot that the warm-up empties before that request's step runs."""
    a, b, c = ref("a"), ref("b"), ref("c")
    engine = SlowMovesEngine({a: 10, b: 10, c: 20})
    in_use: list[AdapterRef] = []
    tiers = AdapterTiers(engine, Budgets(ram=100, vram=20), running=lambda: frozenset(in_use))

    async def request(x):
        in_use.append(x)
        await tiers.to_vram(x)

    async def scenario():
        for x in (a, b):
            await tiers.to_vram(x)
        await tiers.to_ram(c)
        warm = asyncio.create_task(tiers.to_vram(c))  # evicts a and b, slowly
        await asyncio.sleep(0.001)  # inside the first demote
        await asyncio.gather(request(a), request(b))
        await warm
        return {x.id for x in in_use if x not in engine.vram}

    assert asyncio.run(scenario()) == set()
    assert engine.vram == {x for x, e in tiers.cache.entries.items() if e.tier is Tier.VRAM}


class EngineThreadMoves(SlowMovesEngine):
    """Like the real engine, a move once started finishes on the engine's thread, whoever stops
    waiting for it."""

    async def attach(self, adapter):
        await asyncio.shield(asyncio.ensure_future(super().attach(adapter)))

    async def demote(self, adapter):
        await asyncio.shield(asyncio.ensure_future(super().demote(adapter)))


def test_a_caller_cancelled_in_the_middle_of_a_move_leaves_books_and_engine_in_step():
    """An admin warm-up or eviction whose caller gives up (a gRPC deadline) mid-move: the move
    and its booking complete together, so a later request is never handed a slot the books
    call free, nor refused one the engine holds."""
    a, b = ref("a"), ref("b")
    engine = EngineThreadMoves({a: 10, b: 10})
    tiers = AdapterTiers(engine, Budgets(ram=100, vram=10))

    async def cancelled_mid_move(move):
        task = asyncio.create_task(move)
        await asyncio.sleep(0.001)  # inside the engine's move
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with tiers._moves:  # the move, left to finish, has let go of the lock
            pass

    def books(tier):
        return {x for x, e in tiers.cache.entries.items() if e.tier is tier}

    async def scenario():
        await tiers.to_ram(a)
        await cancelled_mid_move(tiers.to_vram(a))
        assert engine.vram == books(Tier.VRAM) == {a}
        await cancelled_mid_move(tiers.evict(a, Tier.RAM))
        assert engine.vram == books(Tier.VRAM) == set() and engine.ram == books(Tier.RAM) == {a}
        await tiers.to_ram(b)
        await tiers.to_vram(a)
        await cancelled_mid_move(tiers.to_vram(b))  # demotes a, then attaches b
        assert engine.vram == books(Tier.VRAM) == {b} and engine.ram == books(Tier.RAM) == {a}

    asyncio.run(scenario())


class HeldBytesEngine(SlowMovesEngine):
    """Counts what it really holds in RAM as each move happens: a demotion's copy exists before
    the attach that needed its slot lets go of the attached adapter's copy (as TorchEngine)."""

    def held_ram(self) -> int:
        return sum(self.sizes[a] for a in self.ram)


def test_no_instant_of_churn_holds_or_reports_more_than_a_budget():
    """A poller wakes at every await of the moves (each engine move sleeps) and reads what the
    admin API and /metrics read (tier_states), and what the engine holds."""
    rng = random.Random(11)
    adapters = [ref(f"a{i}") for i in range(9)]
    engine = HeldBytesEngine({a: 10 for a in adapters})
    budgets = Budgets(ram=70, vram=20)  # 7 adapters fit in RAM, 2 attached
    tiers = AdapterTiers(engine, budgets)
    seen = {"samples": 0, "ram": 0, "vram": 0, "held": 0}
    done = asyncio.Event()

    async def poll():
        while not done.is_set():
            states = tiers.tier_states()
            seen["samples"] += 1
            seen["ram"] = max(seen["ram"], states[Tier.RAM].bytes_used)
            seen["vram"] = max(seen["vram"], states[Tier.VRAM].bytes_used)
            seen["held"] = max(seen["held"], engine.held_ram())
            assert states[Tier.RAM].adapters <= 7 and states[Tier.VRAM].adapters <= 2
            await asyncio.sleep(0)

    async def churn():
        for _ in range(400):
            a = rng.choice(adapters)
            try:
                if rng.random() < 0.8:
                    await tiers.to_vram(a)
                else:
                    await tiers.evict(a, rng.choice([Tier.RAM, Tier.DISK]))
            except NoRoom:
                pass
        done.set()

    async def scenario():
        await asyncio.gather(poll(), churn())

    asyncio.run(scenario())
    assert seen["samples"] > 1000
    assert seen["ram"] <= budgets.ram and seen["vram"] <= budgets.vram and seen["held"] <= budgets.ram, seen
    assert seen["ram"] == budgets.ram  # the churn did fill RAM: the bound was tested, not just idle
