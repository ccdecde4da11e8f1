"""The request queue and the engine loop.

One loop task owns the engine: it takes the next batch chosen by
policy.select_batch among requests whose adapter is already in memory, attaches
that adapter, prefills the batch and decodes until every row has finished or
been cancelled. Cold adapters are read from disk meanwhile through
AdapterTiers (at most `max_loads` reads at once, one per adapter), so resident
adapters keep being served while others load. Adapter choice is a per-row argument
to the engine, never shared mutable state, so a request cannot be answered by
another request's adapter (the race in seed 003).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from scheduler.engine import Engine, Row, StepResult, TextJob
from scheduler.cache import Budgets, NoRoom, Tier
from scheduler.errors import (DeadlineTooShort, GenerationFailed, LoraServeError, OutOfMemory, QueueFull, Shed,
                              ShuttingDown)
from scheduler.blocks import BlockManager, BlockTable
from scheduler.fallback import carried, to_base
from scheduler.observer import NullObserver, Observer
from scheduler.policy import BatchLimits, fair_order, select_batch, should_join
from scheduler.text import find_stop, stable_length
from scheduler.tiers import AdapterTiers, Fetch, Origin
from scheduler.types import (BASE, AdapterRef, Completion, Cost, FinishReason, GenerationRequest,
                             TextDelta, Timeline, TokenLogprob)

log = logging.getLogger(__name__)

SHADOW_SHARE = 4
"""Shadow requests run only while a batch's real rows are under 1/SHADOW_SHARE of max_batch_size."""


@dataclass
class SchedulerStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled_in_queue: int = 0
    cancelled_running: int = 0
    batches: int = 0
    prefilled_requests: int = 0
    oom_splits: int = 0
    """Steps that ran out of memory and were retried as two halves."""
    failed_splits: int = 0
    """Steps that failed otherwise and were retried as two halves, to find whose data failed them."""
    preemptions: int = 0
    """Running sequences sent back to wait (their KV blocks freed) so that others could grow."""
    shadows_shed: int = 0
    """Shadow requests dropped, queued or running, to make way for real ones."""


@dataclass(eq=False)
class _Seq:
    seq_id: int
    req: GenerationRequest
    enqueued_at: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    timeline: Timeline = field(default_factory=Timeline)
    cost: Cost = field(default_factory=Cost)
    load_source: Tier = Tier.VRAM
    table: BlockTable | None = None
    """Its KV blocks while it runs (None while it waits)."""
    generated: list[int] = field(default_factory=list)
    detok: tuple[int, int] = (0, 0)
    """Incremental detokenisation offsets into `generated`: (text context start, text returned up to)."""
    ending: FinishReason | None = None
    """Its last token ended it (EOS, length): it steps no more; it finishes once that token's text is in."""
    text: str = ""
    emitted: int = 0
    done: bool = False
    cancelled: bool = False
    dispatched: bool = False
    """Admitted once already (a preempted sequence resumes with its first admission's figures)."""
    suspect: bool = False
    """A step that raised or failed held it: its blocks may hold non-finite values."""
    cached_tokens: int = 0
    target: int = 0
    """While it prefills: the context positions its prefill fills (0 once it decodes)."""
    prefilled: int = 0
    """Context positions whose keys its blocks hold (shared prefix included)."""
    upto: int = 0
    """The end of the context chunk its current prefill step computes."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per generated token, when the request asks for logprobs."""
    prompt_scores: list[TokenLogprob | None] = field(default_factory=list)
    """When it asks for prompt logprobs: one per prompt token, None until a prefill chunk of its
    first admission has computed it (a re-prefill after a preemption computes them no more)."""
    sent: int = 0
    """Generated tokens already carried by a TextDelta."""

    @property
    def output_tokens(self) -> int:
        return len(self.generated)

    @property
    def context(self) -> tuple[int, ...]:
        """What a prefill computes now: the prompt, and what it generated before a preemption."""
        return (*self.req.prompt_ids, *self.generated)

    @property
    def length(self) -> int:
        """Positions a decode step has filled after its next write (Row.length + 1)."""
        return len(self.req.prompt_ids) + len(self.generated)

    @property
    def wants_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token to return (None: no prompt logprobs); score_only asks."""
        req = self.req
        return req.prompt_logprobs if req.prompt_logprobs is not None or not req.score_only else 0

    @property
    def scoring(self) -> bool:
        """Whether its prefill still has prompt logprobs to compute."""
        return self.wants_prompt_logprobs is not None and None in self.prompt_scores[1:]

    def row(self) -> Row:
        req = self.req
        return Row(self.seq_id, req.adapter, tuple(self.table.blocks), req.prompt_ids, self.generated,
                   req.sampling, self.prefilled, self.upto if self.target else 0,
                   bool(self.target), min_new_tokens=req.min_new_tokens, logprobs=req.logprobs,
                   prompt_logprobs=self.wants_prompt_logprobs if self.target and self.scoring else None,
                   response_format=req.response_format)

    def score(self, first: int, entries: tuple[TokenLogprob, ...]) -> None:
        """A prefill chunk's prompt logprobs, the first for prompt token `first`: kept where none
        is yet (a retried or repeated chunk adds nothing twice)."""
        for j, entry in enumerate(entries, start=first):
            if j < len(self.prompt_scores) and self.prompt_scores[j] is None:
                self.prompt_scores[j] = entry

    def emit(self, text: str, upto: int, tokens: int) -> None:
        """Text up to `upto` if it grew, with the generated tokens up to `tokens` not yet sent (and
        their logprobs); at the end (upto = len(text)) whatever tokens are left even without text."""
        if upto > self.emitted or (upto == len(text) and tokens > self.sent):
            self.events.put_nowait(TextDelta(text[self.emitted:upto], tuple(self.generated[self.sent:tokens]),
                                             tuple(self.logprobs[self.sent:tokens])))
            self.emitted, self.sent = max(upto, self.emitted), max(tokens, self.sent)


def _merge_deltas(items: list) -> list:
    merged: list = []
    for item in items:
        if merged and isinstance(item, TextDelta) and isinstance(merged[-1], TextDelta):
            last = merged[-1]
            merged[-1] = TextDelta(last.text + item.text, last.token_ids + item.token_ids,
                                   last.logprobs + item.logprobs)
        else:
            merged.append(item)
    return merged


def _adapter_of(seqs: list[_Seq]) -> AdapterRef:
    """The batch phase's adapter for its span: the common one, else BASE standing for "mixed"."""
    adapters = {s.req.adapter for s in seqs}
    return adapters.pop() if len(adapters) == 1 else replace(BASE, id="mixed")


def _charge(seqs: list[_Seq], ms: float) -> None:
    """Share one engine step's duration among the rows it served (the only place cost is
    counted). A prefill chunk's work grows with the tokens it computes, a decode row makes one
    token: each row weighs its tokens. A step that raised is charged to no one: its rows are
    charged for the retries that served them."""
    weights = [max(s.upto - s.prefilled, 1) if s.target else 1 for s in seqs]
    for s, weight in zip(seqs, weights):
        share = ms * weight / sum(weights)
        if s.target:
            s.cost.prefill_device_ms += share
        else:
            s.cost.decode_device_ms += share


def _alone(exc: Exception) -> LoraServeError:
    """The error of a request whose step failed with no other row in it."""
    if isinstance(exc, OutOfMemory):
        return OutOfMemory(f"{exc.message}; the request does not fit even alone")
    if isinstance(exc, LoraServeError):
        return exc
    log.error("a step failed for one request alone", exc_info=exc)
    return GenerationFailed(f"generation failed: {type(exc).__name__}", error_type=type(exc).__name__)


def _prefix_key(adapter: AdapterRef) -> str:
    """Keys computed under one adapter version's weights are shared only with the same weights."""
    return f"{adapter.key}#{adapter.sha256}"


class Ticket:
    """A submitted request: iterate for TextDelta items then one Completion."""

    def __init__(self, scheduler: Scheduler, seq: _Seq):
        self._scheduler, self._seq = scheduler, seq

    async def events(self) -> AsyncIterator[TextDelta | Completion]:
        """Deltas already waiting are merged into one, so a slow reader gets fewer, larger messages."""
        queue = self._seq.events
        while True:
            items = [await queue.get()]
            items += [queue.get_nowait() for _ in range(queue.qsize())]
            for item in _merge_deltas(items):
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return

    async def result(self) -> Completion:
        async for item in self.events():
            if isinstance(item, Completion):
                return item
        raise AssertionError("event stream ended without a completion")

    def cancel(self) -> None:
        """Withdraw the request: a queued one leaves the queue, a running one leaves its batch
        before the next decode step. A finished one is unaffected."""
        self._scheduler._cancel(self._seq)


class Scheduler:
    def __init__(self, engine: Engine, limits: BatchLimits = BatchLimits(), *, max_queue: int = 1024,
                 batch_wait_s: float = 0.002, budgets: Budgets = Budgets(2 << 30, 1 << 30), max_loads: int = 2,
                 failed_load_backoff_s: float = 30.0, observer: Observer = NullObserver(),
                 clock: Callable[[], float] = time.perf_counter, origin: Origin | None = None,
                 prefix_caching: bool = True, reserve_kv: bool = False):
        """`reserve_kv`: admit a request only with blocks for its prompt and max_new_tokens, so it is
        never preempted (scheduler/blocks.py); deterministic engines need it, and no prefix sharing."""
        self._engine = engine
        self._observer = observer
        self._limits = limits
        self._max_queue = max_queue
        self._batch_wait_s = batch_wait_s
        self._clock = clock
        self._ids = itertools.count(1)
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._kv = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching and not reserve_kv,
                                reserve=reserve_kv)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self.tiers = AdapterTiers(engine, budgets, max_loads=max_loads, running=self._running_adapters,
                                  waiting=self._waiting_adapters, clock=clock, origin=origin)
        self._fetching: set[AdapterRef] = set()
        # Read (or fetched, then read) for waiting requests: (start, ms, the remote fetch if any).
        self._cold: dict[AdapterRef, tuple[float, float, Fetch | None]] = {}
        self._deferred: set[AdapterRef] = set()  # no room yet; retried once rows have left
        self._epoch: list | None = None  # current decode stretch: [start, steps, seq ids, seqs]
        self._failed: dict[AdapterRef, tuple[float, LoraServeError]] = {}
        self._failed_backoff_s = failed_load_backoff_s
        self._service_s: float | None = None  # moving average, dispatch to finish
        self._last_admitted: dict[str, float] = {}  # client -> when one of its requests last got a row
        self._text: asyncio.Task | None = None  # the last step's tokens being decoded into text
        self.stats = SchedulerStats()

    @property
    def kv_blocks(self) -> BlockManager:
        """The KV pool's blocks (read-only use: total, used, cached, prefix hits)."""
        return self._kv

    @property
    def kv_tokens_held(self) -> int:
        """Tokens the running sequences' blocks hold."""
        return sum(s.prefilled if s.target else s.length - 1 for s in self._running if s.table is not None)

    @property
    def queue_depth(self) -> int:
        """Real requests waiting (shadows are not: they never hold a real one back)."""
        return sum(not s.req.shadow for s in self._waiting)

    @property
    def queue_limit(self) -> int:
        """Most requests waiting; beyond it QueueFull."""
        return self._max_queue

    @property
    def running(self) -> int:
        return len(self._live())

    @property
    def waiting_adapters(self) -> frozenset[AdapterRef]:
        """The adapters queued requests wait for."""
        return self._waiting_adapters()

    def _running_adapters(self) -> frozenset[AdapterRef]:
        return frozenset(s.req.adapter for s in self._live())

    def _waiting_adapters(self) -> frozenset[AdapterRef]:
        return frozenset(s.req.adapter for s in self._waiting)

    def _ready(self, adapter: AdapterRef) -> bool:
        return self.tiers.tier_of(adapter) >= Tier.RAM and not self.tiers.loads.loading(adapter)

    def expected_wait_s(self) -> float:
        """How long a request submitted now should wait for a batch row: none while rows are
        free; otherwise rows free up at about max_batch_size per average service time, and it
        needs the one after every request already waiting."""
        rows = self._limits.max_batch_size
        ahead = self.queue_depth + sum(not s.req.shadow for s in self._live()) - rows
        if ahead < 0 or self._service_s is None:
            return 0.0
        return (ahead + 1) * self._service_s / rows

    def submit(self, req: GenerationRequest, time_left_s: float | None = None) -> Ticket:
        """`time_left_s`: the caller's deadline; a request that would still be queued when it
        passes is refused now (DeadlineTooShort) instead of taking a queue slot until then."""
        self.check_accepting()
        if self.queue_depth >= self._max_queue:
            raise QueueFull(self.queue_depth, retry_after_s=max(1.0, self.expected_wait_s()))
        if time_left_s is not None and (expected := self.expected_wait_s()) > time_left_s:
            raise DeadlineTooShort(expected, time_left_s)
        failed = self._failed.get(req.adapter)
        if failed and self._clock() - failed[0] < self._failed_backoff_s:
            # Fail fast instead of re-reading a broken adapter on every request.
            if not carried(req):
                raise failed[1]
            req = to_base(req, failed[1])
        if not req.sampling.greedy and req.sampling.seed is None:
            # Sampling is a pure function of (seed, step): a drawn seed keeps a retried step identical.
            req = replace(req, sampling=replace(req.sampling, seed=random.getrandbits(63)))
        seq = _Seq(next(self._ids), req, self._clock())
        if seq.wants_prompt_logprobs is not None and req.prompt_ids:
            seq.prompt_scores = [TokenLogprob(req.prompt_ids[0], None), *[None] * (len(req.prompt_ids) - 1)]
        seq.timeline.enqueued = seq.enqueued_at
        self._waiting.append(seq)
        self.stats.submitted += 1
        self._idle.clear()
        self._wake.set()
        return Ticket(self, seq)

    def _cancel(self, seq: _Seq) -> None:
        if seq.done or seq.cancelled:
            return
        seq.cancelled = True
        if seq in self._waiting:
            self._waiting.remove(seq)
            self.stats.cancelled_in_queue += 1
            self._update_idle()
        else:
            self.stats.cancelled_running += 1

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
        seqs = [s for s in (*self._waiting, *self._running) if not (s.done or s.cancelled)]
        self._waiting.clear()
        self._fail(seqs, exc)
        self._update_idle()
        self._wake.set()
        return len(seqs)

    async def run(self) -> None:
        """Iteration-level loop: between steps, ready requests join the batch (their prefill runs
        in chunks within the steps that decode the rest) and finished ones have already left."""
        while True:
            if not self._waiting and not self._running:
                await self._settle_text()
                self._update_idle()
                self._wake.clear()
                await self._wake.wait()
                if self._batch_wait_s:
                    # From idle, let requests that arrive together start together.
                    await asyncio.sleep(self._batch_wait_s)
            self._start_fetches()
            await self._scrub()
            progressed = await self._admit()
            if self._live():
                await self._step()
            elif self._running or self._text is not None:
                await self._end_batch()
            elif not progressed and not self._kv.dirty():
                # Everything waiting needs an adapter still loading (or room for it).
                self._wake.clear()
                await self._wake.wait()
            self._update_idle()

    def _start_fetches(self) -> None:
        for adapter in dict.fromkeys(s.req.adapter for s in self._waiting):
            if adapter not in self._fetching | self._deferred and not self._ready(adapter):
                self._fetching.add(adapter)
                asyncio.get_running_loop().create_task(self._fetch(adapter))

    async def _fetch(self, adapter: AdapterRef) -> None:
        started = self._clock()
        try:
            moved = await self.tiers.to_ram(adapter)
            if moved.found_in is Tier.DISK:
                self._cold[adapter] = (started, moved.ms, moved.fetched)
                self._observer.adapter_read(adapter, moved.ms)
        except NoRoom:
            self._deferred.add(adapter)
        except LoraServeError as exc:  # unreadable, or not the weights that were registered
            self._failed[adapter] = (self._clock(), exc)
            self._fail_or_fallback([s for s in self._waiting if s.req.adapter == adapter], exc)
        finally:
            self._fetching.discard(adapter)
            self._update_idle()
            self._wake.set()

    def _update_idle(self) -> None:
        if not self._waiting and not self._running and self._text is None:
            self._idle.set()

    async def _scrub(self) -> None:
        """Blocks failed sequences held are zeroed before anyone is given them (scheduler/blocks.py)."""
        dirty = self._kv.dirty()
        if not dirty:
            return
        try:
            await self._engine.scrub(dirty)
        except Exception:  # they stay out of the free list; the next round tries again
            log.exception("zeroing %d KV blocks failed", len(dirty))
            return
        self._kv.scrubbed(dirty)

    def _take_blocks(self, picked: list[_Seq]) -> list[_Seq]:
        """KV blocks for the picked requests, in order, up to the first that does not fit (it and
        those after it wait: a big request is not overtaken forever by small ones)."""
        admitted = []
        for seq in picked:
            # Prompt logprobs need every prompt position computed: no shared prefix for them.
            seq.table = self._kv.admit(_prefix_key(seq.req.adapter), seq.context, seq.req.token_budget,
                                       count=not seq.dispatched, share=not seq.scoring)
            if seq.table is None:
                break
            if not seq.dispatched:  # a resumed sequence's hits are its own re-published blocks
                seq.cached_tokens = min(seq.table.cached_tokens, len(seq.req.prompt_ids))
            seq.target, seq.prefilled = len(seq.context), seq.table.cached_tokens
            admitted.append(seq)
        return admitted

    async def _admit(self) -> bool:
        """Let ready waiting requests join the batch; returns whether any did."""
        self._reap()
        self._give_way()
        live = self._live()
        ready = [s for s in self._waiting if self._ready(s.req.adapter) and s.req.adapter not in self._deferred]
        oldest_wait = self._clock() - ready[0].enqueued_at if ready else 0.0
        room = self._limits.max_batch_size - len(live)
        if not should_join(len(ready), room, len(live), oldest_wait, self._limits):
            return False
        ready = [ready[i] for i in fair_order([s.req for s in ready], [s.req for s in live], self._last_admitted)]
        ready.sort(key=lambda s: s.req.shadow)  # stable: real requests first, each in its turn
        if sum(not s.req.shadow for s in (*live, *ready)) >= self._shadow_rows_below:
            ready = [s for s in ready if not s.req.shadow]
        picked = [ready[i] for i in select_batch([s.req for s in ready], self._limits, [s.req for s in live])][:room]
        picked = self._take_blocks(self._one_prefill_per_prompt(picked))
        if not picked:
            return False
        started = self._clock()
        fresh = [s for s in picked if not s.dispatched]  # a preempted sequence keeps its first admission's figures
        for seq in picked:
            self._waiting.remove(seq)
            self._last_admitted[seq.req.client] = started
        for seq in fresh:
            seq.timeline.dispatched = started
        self._running.extend(picked)  # from here their adapters are protected from eviction
        usable = set()
        for adapter in dict.fromkeys(s.req.adapter for s in picked):
            group = [s for s in picked if s.req.adapter == adapter]
            if await self._make_usable(adapter, group):
                usable.update(group)
        joiners = [s for s in picked if s in usable and not (s.done or s.cancelled)]
        if not joiners:
            return False
        new = [s for s in joiners if not s.dispatched]
        for seq in joiners:
            seq.dispatched = True
        if new:
            self.stats.batches += 1
            self.stats.prefilled_requests += len(new)
        return True

    def _one_prefill_per_prompt(self, picked: list[_Seq]) -> list[_Seq]:
        """Newcomers with the same adapter version and prompt as a row still prefilling, or as one
        picked before them (a request's n choices), wait for it: once its prefill publishes the
        prompt's blocks they join sharing them (the prefix cache) instead of computing it again."""
        if not self._kv.prefix_caching:
            return picked
        busy = {(s.req.adapter, s.req.prompt_ids) for s in self._live() if s.target}
        out = []
        for seq in picked:
            key = (seq.req.adapter, seq.req.prompt_ids)
            shares = not seq.dispatched and not seq.scoring and len(seq.req.prompt_ids) > self._kv.block_size
            if shares and key in busy:
                continue
            busy.add(key)
            out.append(seq)
        return out

    @property
    def _shadow_rows_below(self) -> int:
        """Shadows join a batch, and stay in it, only while it has fewer real rows than this: a
        row is not free on every device (on a CPU each one adds to the step's time)."""
        return max(1, self._limits.max_batch_size // SHADOW_SHARE)

    def _give_way(self) -> None:
        """Shadows run only on spare capacity: when more real requests wait than rows are free,
        no shadow waits; running shadows leave their rows to the real requests ready to take
        them, and leave the batch once it has _shadow_rows_below real rows. (Shadows also join
        only after the real requests ready, and only below that: _admit.)"""
        real = [s for s in self._waiting if not s.req.shadow]
        live = self._live()
        room = self._limits.max_batch_size - len(live)
        if sum(not s.req.shadow for s in live) >= self._shadow_rows_below:
            for seq in [s for s in live if s.req.shadow]:
                self._shed(seq)
            room = self._limits.max_batch_size - len(self._live())
        if len(real) <= room:
            return
        for seq in [s for s in self._waiting if s.req.shadow]:
            self._shed(seq)
        short = sum(self._ready(s.req.adapter) for s in real) - room
        for seq in [s for s in reversed(self._live()) if s.req.shadow][:max(short, 0)]:
            self._shed(seq)

    def _shed(self, seq: _Seq) -> None:
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq in self._running:
            self._running.remove(seq)
            self._release(seq)
        seq.done = True
        self.stats.shadows_shed += 1
        seq.events.put_nowait(Shed(f"shadow request {seq.req.request_id} gave way to real traffic"))
        self._update_idle()

    def _decoding(self) -> list[_Seq]:
        return [s for s in self._live() if not s.target]

    def _chunks(self) -> list[_Seq]:
        """Prefilling rows and the chunk each computes this step, oldest first, within what the
        step's token budget leaves after one token per decoding row; the oldest always gets at
        least one block's worth, so prefills progress under any decode load."""
        budget = self._limits.max_num_batched_tokens - len(self._decoding())
        budget = max(budget, self._kv.block_size)
        chosen = []
        for seq in (s for s in self._live() if s.target):
            n = min(seq.target - seq.prefilled, budget)
            if n <= 0:
                break
            seq.upto = seq.prefilled + n
            budget -= n
            chosen.append(seq)
        return chosen

    async def _run_step(self, seqs: list[_Seq]) -> list[tuple[_Seq, StepResult]]:
        """One step over `seqs`. The engine keeps no batch and a failed step leaves no trace, so
        a step that raises is retried as two halves until the rows whose data fail it are alone:
        they fail (out of memory: the request does not fit even alone), every other row goes on
        as if they had never been there."""
        seqs = [s for s in seqs if not (s.done or s.cancelled)]
        if not seqs:
            return []
        rows = [s.row() for s in seqs]
        try:
            t0 = self._clock()
            results = await self._engine.step(rows)
            _charge(seqs, (self._clock() - t0) * 1e3)
            return list(zip(seqs, results, strict=True))
        except Exception as exc:
            for seq in seqs:  # what the failed step wrote into their blocks may not be finite
                seq.suspect = True
            if len(seqs) == 1:
                self._fail(seqs, _alone(exc))
                return []
            if isinstance(exc, OutOfMemory):
                self.stats.oom_splits += 1
            else:
                self.stats.failed_splits += 1
                log.warning("a step of %d rows failed (%s: %s); retrying its halves", len(seqs),
                            type(exc).__name__, exc)
            half = len(seqs) // 2
            return await self._run_step(seqs[:half]) + await self._run_step(seqs[half:])

    async def _make_usable(self, adapter: AdapterRef, group: list[_Seq]) -> bool:
        """Attach `adapter` for `group`; on failure they go back to waiting, fall back or fail."""
        started = self._clock()
        try:
            moved = await self.tiers.to_vram(adapter)
        except NoRoom as exc:
            self._requeue(group)
            if any(s.req.adapter != adapter for s in self._live()):
                self._deferred.add(adapter)  # the batch's other adapters fill VRAM: wait for rows to leave
            else:
                self._fail_or_fallback(group, exc)
            return False
        except LoraServeError as exc:
            self._requeue(group)
            self._fail_or_fallback(group, exc)  # fallen-back requests join a later round
            return False
        loaded = self._clock()
        cold = self._cold.pop(adapter, None)
        found_in = Tier.DISK if cold is not None else moved.found_in
        fetched = cold[2] if cold is not None else moved.fetched
        source = Tier.REMOTE if fetched is not None else found_in
        entry = self.tiers.cache.entries.get(adapter)
        fresh = [s for s in group if not s.dispatched]
        for seq in fresh:
            seq.load_source = source
            t = seq.timeline
            t.load_ms = moved.ms + (cold[1] if cold else 0.0)
            seq.cost.adapter_load_ms = t.load_ms / len(fresh)  # one load, made for all of them
            t.load_started, t.load_ended = (cold[0] if cold else started), loaded
            t.load_shared = cold is not None and cold[0] < t.enqueued
            t.load_bytes = entry.bytes if entry else 0
            t.fetch_bytes, t.fetch_ms = (fetched.bytes, fetched.ms) if fetched is not None else (0, 0.0)
            self.tiers.record_use(adapter, found_in)
        if fresh:
            self._observer.adapter_ready(adapter, source, fresh[0].timeline.load_ms)
        return True

    def _release(self, seq: _Seq) -> None:
        """Its KV blocks go back; a failed row, or one a failed step held, may have left non-finite
        keys in them, so those wait to be zeroed."""
        if seq.table is not None:
            self._kv.release(seq.table, clean=not seq.suspect)
            seq.table = None

    def _requeue(self, group: list[_Seq]) -> None:
        for seq in group:
            self._running.remove(seq)
            self._release(seq)
        self._waiting[:0] = group

    def _make_room(self) -> None:
        """Every live row gets the block its next position needs; when none is free, the most
        recently admitted row is preempted (blocks freed, back to the queue's front, prefilled
        again later with what it generated), as vLLM does, until the older rows fit."""
        live = self._live()
        for seq in list(live):
            if seq not in live:
                continue
            while not self._kv.grow(seq.table, seq.length):
                shadow = next((s for s in reversed(live) if s.req.shadow), None)
                victim = shadow or live.pop()
                if shadow is not None:  # shed, not preempted: nobody waits for its answer
                    live.remove(shadow)
                    self._shed(shadow)
                else:
                    self._preempt(victim)
                if victim is seq:
                    break

    def _preempt(self, seq: _Seq) -> None:
        self._running.remove(seq)
        self._release(seq)
        self._waiting.insert(0, seq)
        self.stats.preemptions += 1
        log.info("request %s preempted after %d tokens: the KV pool is full; it resumes when blocks free up",
                 seq.req.request_id, len(seq.generated))

    async def _step(self) -> None:
        """One engine step (vLLM's chunked prefill, SARATHI): every decoding row makes a token, and
        prefilling rows compute their next chunks within what the token budget leaves (_chunks),
        in the same forward. A row whose chunk ends its context gets its first token (or,
        resumed after a preemption, its next one) and decodes from the next step; the others
        go on with their next chunk then, so a long prompt never stalls the running rows for
        more than one budgeted step."""
        self._make_room()
        decoding = self._decoding()
        chunks = self._chunks()
        if not decoding + chunks:
            return
        ids = [s.seq_id for s in decoding]
        if self._epoch is None or self._epoch[2] != ids:
            self._close_epoch()
            if decoding:
                self._epoch = [self._clock(), 0, ids, decoding]
        t0 = self._clock()
        step = asyncio.ensure_future(self._run_step(decoding + chunks))
        await self._settle_text()  # the previous step's text, decoded while this step runs
        results = await step
        t1 = self._clock()
        if self._epoch is not None:
            self._epoch[1] += 1
        for seq in decoding:
            seq.timeline.decode_ms += (t1 - t0) * 1e3
        for seq in chunks:
            seq.timeline.prefill_ms += (t1 - t0) * 1e3
        served = [s for s, _ in results if s.target]
        if served:
            self._observer.batch_phase("prefill", t0, t1, _adapter_of(served), [s.req.request_id for s in served], 1)
        self._apply([(seq, res) for seq, res in results if self._chunk_done(seq, res, t1)])
        self._reap()
        if not self._running:
            await self._end_batch()

    def _chunk_done(self, seq: _Seq, res: StepResult, now: float) -> bool:
        """Whether this step's result is the row's next token: a decoding row's always; a prefill
        chunk's once the chunk ends its context (its blocks then hold good keys: shareable)."""
        if not seq.target or res.error is not None or seq.done or seq.cancelled:
            return True
        if res.prompt_logprobs:
            seq.score(seq.prefilled + 1, res.prompt_logprobs)
        seq.prefilled = seq.upto
        if seq.upto < seq.target:
            return False  # a chunk: its token is not the next one yet
        self._kv.publish(seq.table, _prefix_key(seq.req.adapter), seq.context[:seq.target])
        seq.target = 0
        if not seq.generated:
            seq.timeline.first_token = now
        return True

    def _reap(self) -> None:
        """Rows that finished, failed or were cancelled leave: their KV slots are free again."""
        gone = [s for s in self._running if s.done or s.cancelled or s.ending]
        if not gone:
            return
        for seq in gone:
            self._release(seq)
        self._running = self._live()
        self._deferred.clear()  # rows left: room may have been freed

    def _close_epoch(self) -> None:
        """One decode span per stretch of steps with the same rows."""
        if self._epoch is not None and self._epoch[1]:
            start, steps, _, seqs = self._epoch
            self._observer.batch_phase("decode", start, self._clock(), _adapter_of(seqs),
                                       [s.req.request_id for s in seqs], steps)
        self._epoch = None

    async def _end_batch(self) -> None:
        await self._settle_text()
        self._close_epoch()
        self._reap()
        self._deferred.clear()

    def _live(self) -> list[_Seq]:
        return [s for s in self._running if not (s.done or s.cancelled or s.ending)]

    def _fail_or_fallback(self, seqs: list[_Seq], exc: LoraServeError) -> None:
        """Requests that allow it move to the base model (and say so); the rest fail with `exc`."""
        failing = []
        for seq in seqs:
            if carried(seq.req, seq.output_tokens):
                seq.req = to_base(seq.req, exc)
            else:
                failing.append(seq)
                if seq in self._waiting:
                    self._waiting.remove(seq)
        self._fail(failing, exc)

    def _fail(self, batch: list[_Seq], exc: LoraServeError) -> None:
        for seq in batch:
            if not (seq.done or seq.cancelled):
                seq.done = seq.suspect = True
                self.stats.failed += 1
                seq.events.put_nowait(exc)

    def _apply(self, results: list[tuple[_Seq, StepResult]]) -> None:
        """Each row's token: appended, and the row ends on EOS or its length (it steps no more);
        the tokens' text is decoded off the step's thread (Engine.detokenize) while the next step
        runs, and applied before that step's tokens (_settle_text)."""
        eos = self._engine.eos_token_ids
        jobs = []
        for seq, res in results:
            if seq.done or seq.cancelled:
                continue
            if res.error is not None:
                self._fail([seq], res.error)
                continue
            if seq.req.score_only:  # its prefill is the answer: the token it would start with is not
                self._finish(seq, "", FinishReason.LENGTH)
                continue
            seq.generated.append(res.token_id)
            if seq.req.logprobs is not None:
                seq.logprobs.append(res.logprob)
            seq.ending = (FinishReason.EOS if res.token_id in eos and not seq.req.ignore_eos else
                          FinishReason.LENGTH if seq.output_tokens >= seq.req.max_new_tokens else None)
            prefix, read = seq.detok
            jobs.append((seq, TextJob(seq.seq_id, tuple(seq.generated[prefix:]), read - prefix, len(seq.generated) - 1)))
        if jobs:
            self._text = asyncio.ensure_future(self._apply_text(jobs))

    async def _settle_text(self) -> None:
        if self._text is not None:
            await self._text
            self._text = None  # only now: until its rows have finished, the scheduler is not idle

    async def _apply_text(self, jobs: list[tuple[_Seq, TextJob]]) -> None:
        """Stop sequences are found in the text, so a row that meets one may have run one step
        past it: that step's token is dropped (the row is done by then) and its blocks freed."""
        try:
            texts = await self._engine.detokenize([job for _, job in jobs])
        except Exception as exc:  # the engine's own failure: these rows fail, the loop goes on
            log.exception("decoding the text of %d rows failed", len(jobs))
            texts = [_alone(exc)] * len(jobs)
        for (seq, job), out in zip(jobs, texts, strict=True):
            if seq.done or seq.cancelled:
                continue
            if isinstance(out, LoraServeError):
                self._fail([seq], out)
                continue
            prefix, tokens = seq.detok[0], job.position + 1
            seq.detok = (prefix + out.prefix, prefix + out.read)
            stops, searched = seq.req.stop_sequences, len(seq.text)
            seq.text = text = seq.text + out.text
            if seq.ending is not None:
                text += out.held  # nothing more will complete it: the decoder's text as it is
            # Only the new text (and a stop's length before it) can hold a new match, and none
            # counts before min_new_tokens; text already streamed (then) is never taken back.
            stopping = stops and tokens >= seq.req.min_new_tokens
            start = max(searched - max(map(len, stops)) + 1, seq.emitted) if stopping else 0
            cut = find_stop(text, stops, start) if stopping else -1
            if cut >= 0:
                self._finish(seq, text[:cut], FinishReason.STOP_SEQUENCE)
            elif seq.ending is not None:
                self._finish(seq, text, seq.ending)
            else:
                seq.emit(text, stable_length(text, stops if stopping else ()), tokens)

    def _finish(self, seq: _Seq, text: str, reason: FinishReason) -> None:
        seq.emit(text, len(text), len(seq.generated))
        seq.done = True
        seq.timeline.finished = self._clock()
        self.stats.completed += 1
        took = seq.timeline.finished - seq.timeline.dispatched
        self._service_s = took if self._service_s is None else 0.9 * self._service_s + 0.1 * took
        seq.events.put_nowait(Completion(
            request_id=seq.req.request_id, text=text, finish_reason=reason,
            input_tokens=len(seq.req.prompt_ids), output_tokens=seq.output_tokens,
            adapter=seq.req.adapter, load_source=seq.load_source,
            fallback_reason=seq.req.fallback_reason, fallback_from=seq.req.requested, timeline=seq.timeline,
            cost=seq.cost, cached_tokens=seq.cached_tokens, token_ids=tuple(seq.generated),
            logprobs=tuple(seq.logprobs) if seq.req.logprobs is not None else None,
            prompt_logprobs=tuple(seq.prompt_scores) if seq.wants_prompt_logprobs is not None else None,
        ))
