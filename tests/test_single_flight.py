"""Property tests (hypothesis) for LoadLimiter's single-flight reads: hypothesis draws a schedule of
callers asking for keys, reads finishing (with a value or an error) and callers giving up, and a fake
read whose every call waits until the schedule finishes it. Each asserts what LoadLimiter promises."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass

import pytest
from hypothesis import given, settings, strategies as st

from loraserve.scheduler.loads import LoadLimiter

FAST = settings(max_examples=100, deadline=None)
KEYS = "abc"


class ReadFailed(Exception):
    pass


@dataclass(frozen=True, eq=False)
class Value:
    """Compared by identity: joiners of a read get this very object."""

    key: str
    n: int


class FakeReads:
    """Reads that wait until `finish` is called; what each read returned or raised, by (key, nth read)."""

    def __init__(self):
        self.waiting: list[tuple[str, int, asyncio.Future]] = []
        """Reads started and not finished, oldest first."""
        self.count: dict[str, int] = {}
        self.outcomes: dict[tuple[str, int], Value | ReadFailed] = {}
        self.peak = 0
        self.overlapping: list[str] = []
        """Keys read while a read of the same key was still running."""
        self.cancelled: list[tuple[str, int]] = []

    async def read(self, key: str) -> Value:
        n = self.count[key] = self.count.get(key, 0) + 1
        if any(k == key for k, _, _ in self.waiting):
            self.overlapping.append(key)
        entry = (key, n, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self.peak = max(self.peak, len(self.waiting))
        try:
            ok = await entry[2]
        except asyncio.CancelledError:
            self.cancelled.append((key, n))
            raise
        finally:
            self.waiting.remove(entry)
        self.outcomes[key, n] = Value(key, n) if ok else ReadFailed(key, n)
        if ok:
            return self.outcomes[key, n]
        raise self.outcomes[key, n]

    def finish(self, index: int, ok: bool) -> None:
        """Finish one of the reads not yet told to (one told to may not have woken up yet)."""
        unfinished = [future for _, _, future in self.waiting if not future.done()]
        if unfinished:
            unfinished[index % len(unfinished)].set_result(ok)


@dataclass
class Caller:
    key: str
    flight: tuple[str, int] | None = None
    """The (key, nth read) this caller should get the outcome of: set as it asks."""
    task: asyncio.Task | None = None


async def settle() -> None:
    """Long enough for every wakeup a finished read or a cancel sets off to run its course."""
    for _ in range(20):
        await asyncio.sleep(0)


steps = st.lists(st.tuples(st.one_of(
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
    st.tuples(st.just("finish"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
), st.booleans()), max_size=40)
"""Each step, and whether the loop settles after it (or the next step comes before the wakeups run)."""


async def run_schedule(max_concurrent: int, schedule, endings) -> tuple[LoadLimiter, FakeReads, list[Caller],
                                                                       dict[str, int]]:
    reads = FakeReads()
    limiter = LoadLimiter(reads.read, max_concurrent)
    callers: list[Caller] = []
    flights = dict.fromkeys(KEYS, 0)

    async def ask(caller: Caller) -> Value:
        # limiter.loading says whether this get joins a read in flight or starts the next one.
        if not limiter.loading(caller.key):
            flights[caller.key] += 1
        caller.flight = (caller.key, flights[caller.key])
        return await limiter.get(caller.key)

    def check_settled() -> None:
        # A free slot is never left idle while a read waits for one.
        loading = [k for k in KEYS if limiter.loading(k)]
        assert len(reads.waiting) == min(max_concurrent, len(loading))
        assert limiter.running == len(reads.waiting)

    for step, settles in schedule:
        if step[0] == "get":
            caller = Caller(step[1])
            caller.task = asyncio.create_task(ask(caller))
            callers.append(caller)
        elif step[0] == "finish":
            reads.finish(step[1], step[2])
        else:
            waiting = [c for c in callers if not c.task.done()]
            if waiting:
                waiting[step[1] % len(waiting)].task.cancel()
        if settles:
            await settle()
            check_settled()
    await settle()
    check_settled()
    for ok in endings:
        if not reads.waiting:
            break
        reads.finish(0, ok)
        await settle()
        check_settled()
    for _ in callers:  # no more flights than callers
        if not reads.waiting:
            break
        reads.finish(0, True)
        await settle()
        check_settled()
    assert not reads.waiting
    return limiter, reads, callers, flights


@FAST
@given(st.integers(1, 3), steps, st.lists(st.booleans(), max_size=10))
def test_each_key_is_read_once_per_flight_and_every_joiner_gets_that_reads_outcome(max_concurrent, schedule,
                                                                                   endings):
    limiter, reads, callers, flights = asyncio.run(run_schedule(max_concurrent, schedule, endings))
    assert not reads.overlapping, "a key was read again while its read was running"
    assert reads.peak <= max_concurrent and limiter.peak <= max_concurrent
    assert not reads.cancelled, "a caller giving up cancelled a read"
    # Every flight read exactly once, even one all of whose callers gave up.
    assert {k: reads.count.get(k, 0) for k in KEYS} == flights
    assert limiter.started == sum(flights.values())
    for caller in callers:
        assert caller.task.done()
        if caller.task.cancelled():
            continue
        outcome = reads.outcomes[caller.flight]
        if isinstance(outcome, ReadFailed):
            assert caller.task.exception() is outcome
        else:
            assert caller.task.result() is outcome


def test_a_failed_read_is_not_kept_the_next_caller_reads_again():
    async def scenario():
        reads = FakeReads()
        limiter = LoadLimiter(reads.read, 1)
        first, joiner = asyncio.create_task(limiter.get("a")), asyncio.create_task(limiter.get("a"))
        await settle()
        reads.finish(0, False)
        await settle()
        assert not limiter.loading("a")
        again = asyncio.create_task(limiter.get("a"))
        await settle()
        reads.finish(0, True)
        await settle()
        return reads, first, joiner, again

    reads, first, joiner, again = asyncio.run(scenario())
    assert first.exception() is joiner.exception() is reads.outcomes["a", 1]
    assert again.result() is reads.outcomes["a", 2]


def test_a_caller_giving_up_leaves_the_read_to_the_others():
    async def scenario():
        reads = FakeReads()
        limiter = LoadLimiter(reads.read, 1)
        leaving, staying = asyncio.create_task(limiter.get("a")), asyncio.create_task(limiter.get("a"))
        await settle()
        leaving.cancel()
        await settle()
        assert limiter.loading("a") and len(reads.waiting) == 1
        reads.finish(0, True)
        return reads, leaving, await staying

    reads, leaving, got = asyncio.run(scenario())
    assert leaving.cancelled() and got is reads.outcomes["a", 1] and not reads.cancelled


def test_at_least_one_slot():
    with pytest.raises(ValueError):
        LoadLimiter(FakeReads().read, 0)


def test_a_read_everyone_gave_up_on_fails_without_an_unretrieved_error():
    reported = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        release = asyncio.Event()

        async def read(key):
            await release.wait()
            raise ReadFailed(key)

        limiter = LoadLimiter(read, 1)
        waiter = asyncio.create_task(limiter.get("a"))
        await settle()
        waiter.cancel()
        await settle()
        release.set()
        await settle()
        assert not limiter.loading("a")

    asyncio.run(main())
    gc.collect()
    assert not reported, reported
