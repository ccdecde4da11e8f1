"""The request queue and the engine loop.

One loop task owns the engine. Each round it starts reads of the cold adapters queued requests
need (scheduler/readahead.py: AdapterTiers reads at most `max_loads` at once, one per adapter,
so resident adapters keep being served while others load), lets ready requests join the batch
(scheduler/admission.py), and runs one step (scheduler/step.py), whose tokens end requests or
stream their text (scheduler/completion.py). Who waits and who runs is kept in one place
(scheduler/batch.py). Adapter choice is a per-row argument to the engine, never shared mutable
state, so a request cannot be answered by another request's adapter.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import replace
from typing import Callable

from loraserve.scheduler.admission import Admission
from loraserve.scheduler.batch import Batch, SchedulerStats
from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.cache import Budgets
from loraserve.scheduler.completion import Completions
from loraserve.scheduler.engine import Engine
from loraserve.scheduler.errors import DeadlineTooShort, LoraServeError, QueueFull, ShuttingDown
from loraserve.scheduler.fallback import carried, to_base
from loraserve.scheduler.observer import NullObserver, Observer
from loraserve.scheduler.policy import BatchLimits
from loraserve.scheduler.readahead import ReadAhead
from loraserve.scheduler.seq import Seq
from loraserve.scheduler.step import Steps
from loraserve.scheduler.stretch import StepClock
from loraserve.scheduler.ticket import Ticket
from loraserve.scheduler.tiers import AdapterTiers, Origin
from loraserve.scheduler.types import AdapterRef, GenerationRequest, TokenLogprob


class Scheduler:
    def __init__(self, engine: Engine, limits: BatchLimits = BatchLimits(), *, max_queue: int = 1024,
                 batch_wait_s: float = 0.002, budgets: Budgets = Budgets(ram=2 << 30, vram=1 << 30), max_loads: int = 2,
                 failed_load_backoff_s: float = 30.0, observer: Observer = NullObserver(),
                 clock: Callable[[], float] = time.perf_counter, origin: Origin | None = None,
                 prefix_caching: bool = True, reserve_kv: bool = False):
        """`reserve_kv`: admit a request only with blocks for its prompt and max_new_tokens, so it is
        never preempted (scheduler/blocks.py); deterministic engines need it, and no prefix sharing."""
        self._limits = limits
        self._max_queue = max_queue
        self._batch_wait_s = batch_wait_s
        self._clock = clock
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self.stats = SchedulerStats()
        kv = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching and not reserve_kv,
                          reserve=reserve_kv)
        self._batch = Batch(kv, self.stats, settled=self._update_idle)
        self.tiers = AdapterTiers(engine, budgets, max_loads=max_loads, running=self._running_adapters,
                                  waiting=self._waiting_adapters, clock=clock, origin=origin)
        self._completions = Completions(engine, self._batch, clock)
        self._reads = ReadAhead(self.tiers, self._batch, self._completions, observer, clock,
                                failed_load_backoff_s, woke=self._woke)
        self._admission = Admission(self._batch, self._reads, self.tiers, self._completions, limits, observer, clock)
        self._steps = Steps(engine, self._batch, self._completions, clock)
        self._step_clock = StepClock(observer, clock)

    @property
    def kv_blocks(self) -> BlockManager:
        """The KV pool's blocks (read-only use: total, used, cached, prefix hits)."""
        return self._batch.kv

    @property
    def kv_tokens_held(self) -> int:
        """Tokens the running sequences' blocks hold."""
        return sum(s.prefilled if s.target else s.length - 1 for s in self._batch.running if s.table is not None)

    @property
    def queue_depth(self) -> int:
        """Real requests waiting (shadows are not: they never hold a real one back)."""
        return sum(not s.req.shadow for s in self._batch.waiting)

    @property
    def queue_limit(self) -> int:
        """Most requests waiting; beyond it QueueFull."""
        return self._max_queue

    @property
    def running(self) -> int:
        return len(self._batch.live())

    @property
    def waiting_adapters(self) -> frozenset[AdapterRef]:
        """The adapters queued requests wait for."""
        return self._waiting_adapters()

    def _running_adapters(self) -> frozenset[AdapterRef]:
        return frozenset(s.req.adapter for s in self._batch.live())

    def _waiting_adapters(self) -> frozenset[AdapterRef]:
        return frozenset(s.req.adapter for s in self._batch.waiting)

    def expected_wait_s(self) -> float:
        """How long a request submitted now should wait for a batch row: none while rows are
        free; otherwise rows free up at about max_batch_size per average service time, and it
        needs the one after every request already waiting."""
        rows, service_s = self._limits.max_batch_size, self._completions.service_s
        ahead = self.queue_depth + sum(not s.req.shadow for s in self._batch.live()) - rows
        if ahead < 0 or service_s is None:
            return 0.0
        return (ahead + 1) * service_s / rows

    def submit(self, req: GenerationRequest, time_left_s: float | None = None) -> Ticket:
        """`time_left_s`: the caller's deadline; a request that would still be queued when it
        passes is refused now (DeadlineTooShort) instead of taking a queue slot until then."""
        self.check_accepting()
        if self.queue_depth >= self._max_queue:
            raise QueueFull(self.queue_depth, retry_after_s=max(1.0, self.expected_wait_s()))
        if time_left_s is not None and (expected := self.expected_wait_s()) > time_left_s:
            raise DeadlineTooShort(expected, time_left_s)
        if (failed := self._reads.failed_recently(req.adapter)) is not None:
            # Fail fast instead of re-reading a broken adapter on every request.
            if not carried(req):
                raise failed
            req = to_base(req, failed)
        if not req.sampling.greedy and req.sampling.seed is None:
            # Sampling is a pure function of (seed, step): a drawn seed keeps a retried step identical.
            req = replace(req, sampling=replace(req.sampling, seed=random.getrandbits(63)))
        seq = Seq(next(self._ids), req, self._clock())
        if seq.wants_prompt_logprobs is not None and req.prompt_ids:
            seq.prompt_scores = [TokenLogprob(req.prompt_ids[0], None), *[None] * (len(req.prompt_ids) - 1)]
        seq.timeline.enqueued = seq.enqueued_at
        self._batch.waiting.append(seq)
        self.stats.submitted += 1
        self._idle.clear()
        self._wake.set()
        return Ticket(seq, self._batch.cancel)

    def check_accepting(self) -> None:
        """ShuttingDown once draining (submit checks it; the service too, before any work)."""
        if not self._accepting:
            raise ShuttingDown("server is shutting down; retry on another replica")

    async def drain(self) -> None:
        """Refuse new requests and wait until everything queued or running has finished."""
        self._accepting = False
        await self._idle.wait()

    def abandon(self, exc: LoraServeError) -> int:
        """Refuse new requests and fail every queued and running one with `exc` (the server stops
        before they could finish); running rows leave their batch before its next step. Returns
        how many were failed."""
        self._accepting = False
        seqs = [s for s in (*self._batch.waiting, *self._batch.running) if not s.over]
        self._batch.waiting.clear()
        self._completions.fail(seqs, exc)
        self._update_idle()
        self._wake.set()
        return len(seqs)

    async def run(self) -> None:
        """Iteration-level loop: between steps, ready requests join the batch (their prefill runs
        in chunks within the steps that decode the rest) and finished ones have already left."""
        batch = self._batch
        while True:
            if batch.empty():
                await self._completions.settle_text()
                await self._sleep()
                if self._batch_wait_s:
                    # From idle, let requests that arrive together start together.
                    await asyncio.sleep(self._batch_wait_s)
            self._reads.start()
            await self._steps.scrub()
            progressed = await self._admission.admit()
            if batch.live():
                await self._step()
            elif batch.running or self._completions.text is not None:
                await self._end_batch()
            elif not progressed and not batch.kv.dirty():
                await self._sleep()  # everything waiting needs an adapter still loading (or room for it)
            self._update_idle()

    async def _step(self) -> None:
        """One engine step (vLLM's chunked prefill, SARATHI): every decoding row makes a token, and
        prefilling rows compute their next chunks within what the token budget leaves, in the
        same forward. A row whose chunk ends its context gets its first token (or, resumed after
        a preemption, its next one) and decodes from the next step; the others go on with their
        next chunk then, so a long prompt never stalls the running rows for more than one
        budgeted step."""
        self._batch.make_room()
        decoding, chunks = self._batch.decoding(), self._admission.chunks()
        if not decoding + chunks:
            return
        self._step_clock.decoding(decoding)
        t0 = self._clock()
        step = asyncio.ensure_future(self._steps.run(decoding + chunks))
        await self._completions.settle_text()  # the previous step's text, decoded while this step runs
        results = await step
        t1 = self._clock()
        self._step_clock.stepped(decoding, chunks, results, t0, t1)
        self._completions.apply(self._steps.commit(results, t1))
        self._batch.reap()
        if not self._batch.running:
            await self._end_batch()

    async def _end_batch(self) -> None:
        await self._completions.settle_text()
        self._step_clock.close()
        self._batch.reap()
        self._batch.deferred.clear()

    async def _sleep(self) -> None:
        """Until something new: a submit, a read ended, an abandon."""
        self._update_idle()
        self._wake.clear()
        await self._wake.wait()

    def _woke(self) -> None:
        self._update_idle()
        self._wake.set()

    def _update_idle(self) -> None:
        if self._batch.empty() and self._completions.text is None:
            self._idle.set()
