"""The scheduler alone, against a scripted engine: milliseconds, no torch."""

from __future__ import annotations

import asyncio

import pytest
from fakes import WeightsRecorder

from loraserve.scheduler.engine import StepResult, Text
from dataclasses import replace

from loraserve.scheduler.errors import AdapterLoadFailed, DeadlineTooShort, OutOfMemory, QueueFull, ShuttingDown
from loraserve.scheduler.policy import BatchLimits, fair_order, select_batch, should_join
from loraserve.scheduler.scheduler import Scheduler
from loraserve.scheduler.text import find_stop, stable_length
from loraserve.scheduler.types import BASE, AdapterRef, Completion, FinishReason, GenerationRequest, Tier, TextDelta

EOS = 0


def ref(name: str) -> AdapterRef:
    return AdapterRef(name, "1", f"/store/{name}")


def req(rid: str, adapter: AdapterRef = BASE, max_new: int = 4, prompt=(5, 6), stops=()) -> GenerationRequest:
    return GenerationRequest(rid, adapter, tuple(prompt), max_new, stop_sequences=tuple(stops))


class ScriptedEngine(WeightsRecorder):
    """Each row 'generates' its adapter id's letters, one per step, then EOS.

    Stateless like the real engine: a row's next letter follows from the tokens it carries.
    It checks what the scheduler promises: a step only runs rows whose adapter is attached, and
    a KV block a sequence writes belongs to it alone until it leaves (no other row writes there).
    `gate`, when set, holds every decode step until the test releases it.
    """

    eos_token_ids = frozenset({EOS})
    kv_blocks = 256
    kv_block_size = 4

    def __init__(self, fail_adapters=(), fetch_s: float = 0.0, slow: dict[str, float] | None = None,
                 size: int = 100):
        self.prefills: list[list[int]] = []
        self.decodes: list[list[int]] = []
        self.steps: list[tuple[list[int], list[int]]] = []  # per step: (prefilling, decoding) sequences
        self.loads: list[str] = []
        self.gate: asyncio.Event | None = None
        super().__init__()
        self.fetching = self.peak_fetching = 0
        self._fetch_s, self._slow, self._size = fetch_s, slow or {}, size
        self._fail = set(fail_adapters)
        self.owner: dict[int, int] = {}  # KV block -> the sequence that last wrote into it
        self.scrubbed: list[int] = []
        self.cached: list[int] = []  # per prefilled row, positions shared prefix blocks held

    def bytes_once_read(self, adapter):
        return self._size

    async def fetch(self, adapter):
        self.loads.append(adapter.id)
        self.fetching += 1
        self.peak_fetching = max(self.peak_fetching, self.fetching)
        try:
            await asyncio.sleep(self._slow.get(adapter.id, self._fetch_s))
        finally:
            self.fetching -= 1
        if adapter.id in self._fail:
            raise AdapterLoadFailed(adapter.id, "corrupt")
        self.ram.add(adapter)
        return self._size

    async def prefill(self, rows):
        self.prefills.append([r.seq_id for r in rows])
        self.cached += [r.cached for r in rows]
        for r in rows:
            assert len(r.blocks) * self.kv_block_size > len(r.context), "no room for the first decode's position"
            for p in range(r.cached, r.upto or len(r.context)):
                self.owner[r.blocks[p // self.kv_block_size]] = r.seq_id
        return self._step(rows)

    async def scrub(self, blocks):
        self.scrubbed += blocks

    async def decode(self, rows):
        self.decodes.append([r.seq_id for r in rows])
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)  # like the real engine's executor hop, a step lets other tasks run
        size = self.kv_block_size
        for r in rows:
            assert len(r.blocks) > r.length // size, "a row decoded without a block for its position"
            self.owner[r.blocks[r.length // size]] = r.seq_id
            assert all(self.owner[b] == r.seq_id for b in r.blocks[r.cached // size:r.length // size + 1]), \
                "a KV block was handed to two sequences"
        return self._step(rows)

    async def step(self, rows):
        """Each row checked as its kind (prefill chunk or decode), then the whole step as one."""
        chunks, decoding = [r for r in rows if r.prefill], [r for r in rows if not r.prefill]
        self.steps.append(([r.seq_id for r in chunks], [r.seq_id for r in decoding]))
        results = [*(await self.prefill(chunks) if chunks else []), *(await self.decode(decoding) if decoding else [])]
        self._step(rows)
        by_id = {r.seq_id: r for r in results}
        return [by_id[r.seq_id] for r in rows]

    def _step(self, rows):
        written = [b for r in rows for b in r.blocks[r.cached // self.kv_block_size:]]
        assert len(set(written)) == len(written), "two rows of one step write one block"
        assert all(r.adapter.is_base or r.adapter in self.vram for r in rows), "batch ran without its adapter"
        out = []
        for r in rows:
            done = len(r.generated)
            token = ord(r.adapter.id[done]) if done < len(r.adapter.id) else EOS
            out.append(StepResult(r.seq_id, token))
        return out

    async def detokenize(self, jobs):
        """Each new token's letter (the whole generated list is the text's context: detok stays (0, 0))."""
        return [Text(chr(j.ids[-1]) if j.ids[-1] != EOS else "", "", 0, 0) for j in jobs]


async def _with_scheduler(engine, fn, **kwargs):
    scheduler = Scheduler(engine, kwargs.pop("limits", BatchLimits()), batch_wait_s=0, **kwargs)
    task = asyncio.create_task(scheduler.run())
    try:
        return await fn(scheduler)
    finally:
        task.cancel()


def run(engine, fn, **kwargs):
    return asyncio.run(_with_scheduler(engine, fn, **kwargs))


def test_mixed_policy_takes_arrival_order_within_size_and_token_limits():
    waiting = [req("a", ref("x"), max_new=10), req("b", ref("y"), max_new=4), req("c", ref("x"), max_new=10),
               req("d", ref("x"), max_new=100), req("e", ref("x"), max_new=10)]
    # budgets (prompt 2 + max_new): 12, 6, 12, 102, 12
    assert select_batch(waiting, BatchLimits(max_batch_size=8, max_batch_tokens=40)) == [0, 1, 2]
    assert select_batch(waiting, BatchLimits(max_batch_size=2, max_batch_tokens=1000)) == [0, 1]
    running = [req("r", ref("z"), max_new=20)]
    assert select_batch(waiting, BatchLimits(max_batch_size=3, max_batch_tokens=40), running) == [0, 1]
    assert select_batch(waiting, BatchLimits(max_batch_size=1), running) == []
    assert select_batch([], BatchLimits()) == []


def test_grouped_policy_joins_only_the_same_adapter_and_never_jumps_the_queue():
    grouped = BatchLimits(policy="grouped")
    waiting = [req("a", ref("x")), req("c", ref("x")), req("b", ref("y")), req("e", ref("x"))]
    assert select_batch(waiting, grouped) == [0, 1]
    # A running x batch takes x joiners only while no other adapter has waited longer.
    assert select_batch(waiting, grouped, [req("r", ref("x"))]) == [0, 1]
    assert select_batch(waiting[2:], grouped, [req("r", ref("x"))]) == []


def test_each_request_gets_its_own_adapters_text():
    engine = ScriptedEngine()

    async def scenario(s):
        tickets = [s.submit(req(f"r{i}", ref(name), max_new=10)) for i, name in enumerate(["ab", "xyz", "ab", "q"])]
        first = [await t.result() for t in tickets]
        return first + [await s.submit(req("again", ref("ab"))).result()]

    *results, again = run(engine, scenario)
    assert [r.text for r in results] == ["ab", "xyz", "ab", "q"]
    assert all(r.finish_reason is FinishReason.EOS for r in results)
    # r0 and r2 shared the batch that read "ab" from disk; later it is already attached.
    assert results[0].load_source is results[2].load_source is Tier.DISK
    assert again.load_source is Tier.VRAM and again.timings.load_ms == 0
    # All four adapters shared one prefill and one decode batch (mixed policy).
    assert list(map(len, engine.prefills)) == [4, 1] and engine.decodes[0] == [1, 2, 3, 4]


def test_length_stop_sequence_and_streamed_deltas():
    engine = ScriptedEngine()

    async def scenario(s):
        length = await s.submit(req("l", ref("abcdef"), max_new=3)).result()
        events = [e async for e in s.submit(req("s", ref("abcdef"), max_new=10, stops=("cd",))).events()]
        return length, events

    length, events = run(engine, scenario)
    assert (length.text, length.finish_reason, length.output_tokens) == ("abc", FinishReason.LENGTH, 3)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    final = events[-1]
    assert isinstance(final, Completion) and final.finish_reason is FinishReason.STOP_SEQUENCE
    # "c" was held back until it was clear it starts the stop sequence: nothing is ever taken back.
    assert "".join(deltas) == final.text == "ab"


def test_cancel_while_queued_spends_no_compute():
    engine = ScriptedEngine()

    async def scenario(s):
        engine.gate = asyncio.Event()
        first = s.submit(req("first", ref("abc"), max_new=10))
        await asyncio.sleep(0.01)  # first is now decoding, held by the gate
        queued = s.submit(req("queued", ref("zzz")))
        queued.cancel()
        engine.gate.set()
        await first.result()
        return s.stats

    stats = run(engine, scenario)
    assert stats.cancelled_in_queue == 1 and stats.prefilled_requests == 1
    assert engine.loads == ["abc"]


def test_cancel_mid_batch_removes_the_row_from_the_next_step():
    engine = ScriptedEngine()

    async def scenario(s):
        engine.gate = asyncio.Event()
        a = s.submit(req("a", ref("abcdef"), max_new=10))
        b = s.submit(req("b", ref("abcdef"), max_new=10))
        await asyncio.sleep(0.01)
        assert s.running == 2
        b.cancel()
        assert s.running == 1
        engine.gate.set()
        return await a.result()

    result = run(engine, scenario)
    assert result.text == "abcdef"
    assert engine.decodes[0] == [1, 2] and all(step == [1] for step in engine.decodes[1:])


def test_failed_adapter_load_fails_only_its_own_requests_and_is_not_retried_at_once():
    engine = ScriptedEngine(fail_adapters={"bad"})

    async def scenario(s):
        bad, good = s.submit(req("b", ref("bad"))), s.submit(req("g", ref("ok")))
        with pytest.raises(AdapterLoadFailed):
            await bad.result()
        with pytest.raises(AdapterLoadFailed, match="corrupt"):
            s.submit(req("again", ref("bad")))
        return await good.result()

    assert run(engine, scenario).text == "ok"
    assert engine.loads.count("bad") == 1


def test_cold_loads_are_limited_single_flight_and_answered_correctly():
    engine = ScriptedEngine(fetch_s=0.02)
    names = [f"ad{i}" for i in range(10)]

    async def scenario(s):
        tickets = [s.submit(req(f"{n}-{k}", ref(n), max_new=10)) for k in range(3) for n in names]
        return [await t.result() for t in tickets]

    results = run(engine, scenario)
    assert [r.text for r in results] == names * 3
    assert engine.peak_fetching == 2
    assert sorted(engine.loads) == sorted(names)
    assert {r.load_source for r in results} >= {Tier.DISK}


def test_resident_adapters_are_served_while_a_cold_one_loads():
    engine = ScriptedEngine(slow={"cold": 0.2})
    done: list[str] = []

    async def scenario(s):
        async def one(rid, adapter):
            await s.submit(req(rid, ref(adapter))).result()
            done.append(rid)
        await one("warm-up", "hot")
        await asyncio.gather(one("cold", "cold"), one("hot", "hot"))

    run(engine, scenario)
    assert done == ["warm-up", "hot", "cold"]


def test_queue_bound_and_drain():
    engine = ScriptedEngine()

    async def scenario(s):
        engine.gate = asyncio.Event()
        tickets = [s.submit(req(f"r{i}", ref("ab"))) for i in range(2)]
        with pytest.raises(QueueFull) as full:
            s.submit(req("over", ref("ab")))
        assert full.value.retry_after_s > 0
        drained = asyncio.create_task(s.drain())
        await asyncio.sleep(0.01)
        with pytest.raises(ShuttingDown):
            s.submit(req("late", ref("ab")))
        assert not drained.done()
        engine.gate.set()
        await drained
        return [await t.result() for t in tickets]

    assert [r.text for r in run(engine, scenario, max_queue=2)] == ["ab", "ab"]


@pytest.mark.parametrize("text, stops, expected", [
    ("hello wor", ("world",), 6), ("hello", (), 5), ("abc\ufffd", (), 3), ("ab", ("bc", "b"), 1),
    ("xyz", ("q",), 3),
])
def test_stable_length_never_emits_what_could_be_taken_back(text, stops, expected):
    assert stable_length(text, stops) == expected


def test_find_stop_returns_the_earliest_match():
    assert find_stop("one two three", ("three", "two")) == 4
    assert find_stop("abc", ("x",)) == -1


def test_newcomers_join_together_unless_the_batch_is_idle_or_they_have_waited():
    limits = BatchLimits(max_batch_size=16, join_delay_s=0.02)
    assert should_join(ready=1, free_slots=16, running=0, oldest_wait_s=0.0, limits=limits)  # idle: at once
    assert not should_join(ready=1, free_slots=12, running=4, oldest_wait_s=0.001, limits=limits)
    assert should_join(ready=6, free_slots=12, running=4, oldest_wait_s=0.001, limits=limits)  # half the room
    assert should_join(ready=1, free_slots=12, running=4, oldest_wait_s=0.03, limits=limits)  # waited enough
    assert not should_join(ready=5, free_slots=0, running=16, oldest_wait_s=1.0, limits=limits)  # full


def test_a_request_arriving_mid_batch_joins_it_between_decode_steps():
    engine = ScriptedEngine()

    async def scenario(s):
        engine.gate = asyncio.Event()
        first = s.submit(req("long", ref("abcdefgh"), max_new=20))
        await asyncio.sleep(0.01)
        second = s.submit(req("late", ref("xy"), max_new=20))
        await asyncio.sleep(0.05)  # past join_delay_s
        engine.gate.set()
        return await first.result(), await second.result()

    long, late = run(engine, scenario, limits=BatchLimits(join_delay_s=0.02))
    assert (long.text, late.text) == ("abcdefgh", "xy")
    # "late" was prefilled on its own, in the same step (one forward) as a decode of "long", then
    # decoded in the same steps as "long" until both were done.
    assert list(map(len, engine.prefills)) == [1, 1]
    assert ([2], [1]) in engine.steps and [1, 2] in engine.decodes


def test_fair_order_lets_clients_take_turns():
    noisy = [replace(req(f"n{i}"), client="noisy") for i in range(4)]
    quiet = [replace(req(f"q{i}"), client="quiet") for i in range(2)]
    waiting = noisy + quiet  # the noisy client queued first
    order = [waiting[i].request_id for i in fair_order(waiting)]
    assert order == ["n0", "q0", "n1", "q1", "n2", "n3"]
    # A client already holding rows waits behind one that holds none.
    running = [replace(req("r0"), client="noisy"), replace(req("r1"), client="noisy")]
    order = [waiting[i].request_id for i in fair_order(waiting, running)]
    assert order[:3] == ["q0", "q1", "n0"]
    # Rows freeing one at a time: equal turns go to the client served least recently.
    order = [waiting[i].request_id for i in fair_order(waiting, (), {"noisy": 2.0, "quiet": 1.0})]
    assert order[:2] == ["q0", "n0"]


def test_noisy_client_cannot_starve_a_quiet_one():
    engine = ScriptedEngine()

    async def scenario(s):
        engine.gate = asyncio.Event()
        noisy = [s.submit(replace(req(f"n{i}", ref("ab")), client="noisy")) for i in range(8)]
        await asyncio.sleep(0.01)  # the first batch (two noisy rows) is decoding
        quiet = [s.submit(replace(req(f"q{i}", ref("ab")), client="quiet")) for i in range(2)]
        engine.gate.set()
        done = []

        async def record(name, ticket):
            await ticket.result()
            done.append(name)
        await asyncio.gather(*(record(f"n{i}", t) for i, t in enumerate(noisy)),
                             *(record(f"q{i}", t) for i, t in enumerate(quiet)))
        return done

    done = run(engine, scenario, limits=BatchLimits(max_batch_size=2, join_delay_s=0))
    # FIFO would finish all eight noisy requests first; taking turns serves the quiet client
    # in the second and third rounds.
    assert done.index("q1") < done.index("n4")


def test_request_that_would_wait_past_its_deadline_is_refused_at_once():
    engine = ScriptedEngine()

    async def scenario(s):
        assert s.expected_wait_s() == 0.0  # nothing known yet, nothing waiting
        await s.submit(req("warm", ref("abcdefgh"), max_new=10)).result()
        engine.gate = asyncio.Event()
        busy = [s.submit(req(f"b{i}", ref("abcdefgh"), max_new=10)) for i in range(2)]
        await asyncio.sleep(0.01)
        wait = s.expected_wait_s()
        assert wait > 0  # the batch is full
        with pytest.raises(DeadlineTooShort):
            s.submit(req("hurried", ref("ab")), time_left_s=wait / 2)
        patient = s.submit(req("patient", ref("ab")), time_left_s=wait * 100 + 1)
        assert s.queue_depth == 1  # only the patient one queued
        engine.gate.set()
        return [await t.result() for t in (*busy, patient)]

    assert [r.text for r in run(engine, scenario, limits=BatchLimits(max_batch_size=2))] == \
        ["abcdefgh", "abcdefgh", "ab"]


class OutOfMemoryEngine(ScriptedEngine):
    """Prefills of more than `fits` rows run out of memory; `fail_decodes` decode steps fail."""

    def __init__(self, fits: int, fail_decodes: int = 0):
        super().__init__()
        self.fits, self.fail_decodes = fits, fail_decodes

    async def prefill(self, rows):
        if len(rows) > self.fits:
            raise OutOfMemory("not enough memory")
        return await super().prefill(rows)

    async def decode(self, rows):
        if self.fail_decodes:
            self.fail_decodes -= 1
            raise OutOfMemory("not enough memory")
        return await super().decode(rows)


def test_out_of_memory_prefill_is_split_and_retried():
    engine = OutOfMemoryEngine(fits=1)

    async def scenario(s):
        names = ["ab", "xyz", "ab", "q", "mn"]
        tickets = [s.submit(req(f"r{i}", ref(name), max_new=10)) for i, name in enumerate(names)]
        return [await t.result() for t in tickets], s.stats.oom_splits

    results, splits = run(engine, scenario, limits=BatchLimits(max_batch_size=8))
    assert [r.text for r in results] == ["ab", "xyz", "ab", "q", "mn"]
    assert splits >= 2 and max(map(len, engine.prefills)) == 1


def test_request_too_large_even_alone_fails_alone_and_a_decode_out_of_memory_is_split():
    engine = OutOfMemoryEngine(fits=0)

    async def scenario(s):
        with pytest.raises(OutOfMemory):
            await s.submit(req("big", ref("ab"))).result()
        engine.fits = 8
        engine.gate = asyncio.Event()
        tickets = [s.submit(req("one", ref("abc"))), s.submit(req("two", ref("xyz")))]
        while s.running < 2:
            await asyncio.sleep(0)
        engine.fail_decodes = 1  # the next decode of both rows fails; each half then runs alone
        engine.gate.set()
        return [await t.result() for t in tickets], s.stats.oom_splits

    results, splits = run(engine, scenario)
    assert [r.text for r in results] == ["abc", "xyz"] and splits == 1


class MeteredEngine(ScriptedEngine):
    """Steps take time on the scheduler's clock: a prefill 1 ms per prompt token it reads, a decode 3 ms."""

    def __init__(self):
        super().__init__()
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def prefill(self, rows):
        self.now += sum(len(r.prompt_ids) for r in rows) / 1e3
        return await super().prefill(rows)

    async def decode(self, rows):
        self.now += 3 / 1e3
        return await super().decode(rows)


def test_each_step_is_shared_among_its_rows_prefill_by_prompt_tokens_decode_equally():
    engine = MeteredEngine()

    async def scenario(s):
        together = [s.submit(req(f"r{n}", BASE, max_new=3, prompt=(7,) * n)) for n in (2, 4, 6)]
        done = [await t.result() for t in together]
        return done + [await s.submit(req("alone", BASE, max_new=3, prompt=(7, 7))).result()]

    *together, alone = run(engine, scenario, clock=engine.clock)
    # One 12-token prefill (12 ms) and two decode steps of three rows (3 ms each).
    assert [c.cost.prefill_device_ms for c in together] == pytest.approx([2, 4, 6])
    assert [c.cost.decode_device_ms for c in together] == pytest.approx([2, 2, 2])
    assert (alone.cost.prefill_device_ms, alone.cost.decode_device_ms) == pytest.approx((2, 6))
    shares = sum(c.cost.prefill_device_ms + c.cost.decode_device_ms for c in (*together, alone))
    assert shares == pytest.approx(engine.now * 1e3)  # every step's time, charged once


def test_an_adapter_load_is_shared_by_the_requests_it_was_made_for():
    engine = ScriptedEngine(fetch_s=0.01)

    async def scenario(s):
        tickets = [s.submit(req(f"r{i}", ref("ab"))) for i in range(2)]
        return [await t.result() for t in tickets]

    results = run(engine, scenario)
    assert all(r.load_source is Tier.DISK and r.timings.load_ms >= 10 for r in results)
    assert [r.cost.adapter_load_ms for r in results] == [r.timings.load_ms / 2 for r in results]


def test_rows_that_cannot_grow_are_preempted_and_resume_where_they_were():
    engine = ScriptedEngine()
    engine.kv_blocks = 10  # 40 positions; each request grows to 2 + 16 letters + EOS: 5 blocks
    names = ["abcdefghijklmnop", "qrstuvwxyzabcdef", "ghijklmnopqrstuv"]

    async def scenario(s):
        tickets = [s.submit(req(f"r{i}", ref(n), max_new=40)) for i, n in enumerate(names)]
        return [await t.result() for t in tickets], s.stats, s.kv_blocks

    results, stats, blocks = run(engine, scenario)
    assert [r.text for r in results] == names
    assert stats.preemptions > 0 and stats.failed == 0
    assert blocks.used == 0 and blocks.free == 10
    assert max(len(p) for p in engine.prefills) >= 1 and len(engine.prefills) > 1


def test_a_reserving_scheduler_makes_requests_wait_instead_of_preempting():
    engine = ScriptedEngine()
    engine.kv_blocks = 10
    names = ["abcdefghijklmnop", "qrstuvwxyzabcdef", "ghijklmnopqrstuv"]

    async def scenario(s):
        tickets = [s.submit(req(f"r{i}", ref(n), max_new=17)) for i, n in enumerate(names)]
        return [await t.result() for t in tickets], s.stats

    results, stats = run(engine, scenario, reserve_kv=True)
    assert [r.text for r in results] == names and stats.preemptions == 0


def test_a_repeated_prompt_prefix_is_computed_once_per_adapter_version():
    engine = ScriptedEngine()
    prompt = tuple(range(10, 19))  # 9 tokens: two full blocks of 4

    async def scenario(s):
        first = await s.submit(req("a", ref("ab"), prompt=prompt)).result()
        second = await s.submit(req("b", ref("ab"), prompt=prompt)).result()
        other = await s.submit(req("c", ref("xy"), prompt=prompt)).result()
        return first, second, other, s.kv_blocks.prefix

    first, second, other, prefix = run(engine, scenario)
    assert (first.cached_tokens, second.cached_tokens, other.cached_tokens) == (0, 8, 0)
    assert engine.cached == [0, 8, 0] and second.text == first.text == "ab"
    assert (prefix.queried_tokens, prefix.hit_tokens) == (27, 8)


def test_choices_of_one_prompt_submitted_together_compute_it_once():
    engine = ScriptedEngine()
    prompt = tuple(range(10, 19))  # 9 tokens: two full blocks of 4

    async def scenario(s):
        tickets = [s.submit(req(f"n{i}", ref("ab"), prompt=prompt)) for i in range(4)]
        tickets.append(s.submit(req("short", ref("ab"), prompt=(5, 6))))  # one block or less: never held back
        return [await t.result() for t in tickets]

    results = run(engine, scenario, limits=BatchLimits(join_delay_s=0))
    assert [r.cached_tokens for r in results] == [0, 8, 8, 8, 0]
    assert {r.text for r in results} == {"ab"}
    assert engine.prefills[0] == [1, 5]  # the first choice and the short prompt; the others wait for its blocks


def test_blocks_of_a_failed_request_are_zeroed_before_reuse():
    class Poisoning(ScriptedEngine):
        def _step(self, rows):
            out = super()._step(rows)
            return [replace(r, error=OutOfMemory("boom")) if rows[i].adapter.id == "bad" else r
                    for i, r in enumerate(out)]

    engine = Poisoning()

    async def scenario(s):
        with pytest.raises(OutOfMemory):
            await s.submit(req("a", ref("bad"))).result()
        return await s.submit(req("b", ref("ok"))).result()

    assert run(engine, scenario).text == "ok"
    assert engine.scrubbed


def test_a_long_prompt_is_prefilled_in_budgeted_chunks_between_decode_steps():
    class Logged(ScriptedEngine):
        log: list = []

        async def prefill(self, rows):
            self.log.append(("prefill", [(r.seq_id, len(r.fed)) for r in rows]))
            return await super().prefill(rows)

        async def decode(self, rows):
            self.log.append(("decode", [r.seq_id for r in rows]))
            return await super().decode(rows)

    engine = Logged()

    async def scenario(s):
        running = s.submit(req("short", ref("abcdefghijklmno"), max_new=20))
        while not engine.decodes:
            await asyncio.sleep(0)
        long = s.submit(req("long", ref("xyz"), max_new=20, prompt=tuple(range(1, 41))))
        return await running.result(), await long.result()

    short, long = run(engine, scenario, limits=BatchLimits(max_num_batched_tokens=12, join_delay_s=0))
    assert (short.text, long.text) == ("abcdefghijklmno", "xyz")
    chunks = [n for kind, rows in engine.log if kind == "prefill" for seq, n in rows if seq == 2]
    assert sum(chunks) == 40 and max(chunks) <= 11 and len(chunks) == 4  # one token of each step is the decode row's
    # Between two chunks of the long prompt the short request decoded a token.
    steps = [kind for kind, rows in engine.log if (kind == "prefill" and rows[0][0] == 2) or kind == "decode"]
    first = steps.index("prefill")
    assert steps[first:first + 7] == ["prefill", "decode"] * 3 + ["prefill"]


def test_a_request_waiting_for_blocks_a_failed_step_left_dirty_is_not_forgotten():
    """Blocks of rows a raising step held are zeroed before reuse; if they turn dirty while the loop
    has nothing running, it goes on scrubbing instead of sleeping with the request still queued."""
    class Flaky(ScriptedEngine):
        def __init__(self):
            super().__init__()
            self.scrubbing = asyncio.Event()

        async def scrub(self, blocks):
            self.scrubbing.set()
            await asyncio.sleep(0.05)
            self.scrubbed += blocks

        async def decode(self, rows):
            await asyncio.sleep(0.002)
            if any(r.adapter.id.startswith("bad") for r in rows):
                raise RuntimeError("a kernel fault")  # halves: 'bad' fails alone, the other row goes on
            return await super().decode(rows)

    engine = Flaky()
    engine.kv_blocks = 8

    async def scenario(s):
        held = s.submit(req("C", ref("abcdefghijklmnopqrst"), max_new=20, prompt=tuple(range(1, 7))))
        s.submit(req("D", ref("bad"), max_new=20, prompt=(1, 2)))
        while not engine.scrubbing.is_set():
            await asyncio.sleep(0)
        waiting = s.submit(req("W", ref("xyz"), max_new=3, prompt=tuple(range(100, 126))))  # 7 of 8 blocks
        held.cancel()  # it shared the failed step: its blocks turn dirty after this round's scrub began
        return await asyncio.wait_for(waiting.result(), 5), s.kv_blocks

    result, blocks = run(engine, scenario, limits=BatchLimits(join_delay_s=0))
    assert result.text == "xyz" and blocks.dirty() == [] and blocks.used == 0


def test_a_preempted_request_keeps_its_first_admissions_figures():
    engine = ScriptedEngine()
    engine.kv_blocks = 10
    names = ["abcdefghijklmnop", "qrstuvwxyzabcdef", "ghijklmnopqrstuv"]
    prompt = tuple(range(1, 10))  # two full blocks: shared by the three

    async def scenario(s):
        tickets = [s.submit(req(f"r{i}", ref(n), max_new=40, prompt=prompt)) for i, n in enumerate(names)]
        return [await t.result() for t in tickets], s.stats, s.kv_blocks.prefix

    results, stats, prefix = run(engine, scenario)
    assert stats.preemptions > 0 and [r.text for r in results] == names
    assert stats.prefilled_requests == 3
    assert all(r.cached_tokens <= r.input_tokens for r in results)
    assert prefix.queried_tokens == 3 * len(prompt)  # a resumed request's lookup is not counted again
    assert all(r.load_source is Tier.DISK for r in results)


def test_text_still_being_decoded_keeps_the_scheduler_busy_until_its_request_finishes():
    """A row's last token is in, its text not yet: a drain (SIGTERM) must wait for its Completion,
    whatever else makes the scheduler look at its idleness meanwhile (here a queued request cancelled)."""
    class SlowText(ScriptedEngine):
        def __init__(self):
            super().__init__()
            self.gate, self.decoding = asyncio.Event(), asyncio.Event()

        async def detokenize(self, jobs):
            self.decoding.set()
            await self.gate.wait()
            return await super().detokenize(jobs)

    engine = SlowText()

    async def scenario(s):
        first = s.submit(req("a", ref("ab"), max_new=1))
        await engine.decoding.wait()
        s.submit(req("b", ref("cd"))).cancel()
        drained = asyncio.create_task(s.drain())
        await asyncio.sleep(0.02)
        assert not drained.done()
        engine.gate.set()
        done = await first.result()
        await drained
        return done

    assert run(engine, scenario).text == "a"
