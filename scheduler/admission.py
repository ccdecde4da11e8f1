"""Who joins the batch, between steps: real requests before shadows, in fair order among clients
(scheduler/policy.py), those whose adapter is ready, up to the rows and the KV blocks free; their
adapters attached; and how each step's token budget is shared among the rows still prefilling."""

from __future__ import annotations

from typing import Callable

from loraserve.scheduler.batch import Batch
from loraserve.scheduler.cache import NoRoom, Tier
from loraserve.scheduler.completion import Completions
from loraserve.scheduler.errors import LoraServeError
from loraserve.scheduler.observer import Observer
from loraserve.scheduler.policy import BatchLimits, fair_order, select_batch, should_join
from loraserve.scheduler.readahead import ReadAhead
from loraserve.scheduler.seq import Seq, prefix_key
from loraserve.scheduler.tiers import AdapterTiers
from loraserve.scheduler.types import AdapterRef

SHADOW_SHARE = 4
"""Shadow requests run only while a batch's real rows are under 1/SHADOW_SHARE of max_batch_size."""


class Admission:
    def __init__(self, batch: Batch, reads: ReadAhead, tiers: AdapterTiers, completions: Completions,
                 limits: BatchLimits, observer: Observer, clock: Callable[[], float]):
        self._batch = batch
        self._reads = reads
        self._tiers = tiers
        self._completions = completions
        self._limits = limits
        self._observer = observer
        self._clock = clock
        self._last_admitted: dict[str, float] = {}
        """client -> when one of its requests last got a row."""

    async def admit(self) -> bool:
        """Let ready waiting requests join the batch; returns whether any did."""
        batch = self._batch
        batch.reap()
        self._give_way()
        live = batch.live()
        ready = [s for s in batch.waiting if self._reads.ready(s.req.adapter) and s.req.adapter not in batch.deferred]
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
            batch.waiting.remove(seq)
            self._last_admitted[seq.req.client] = started
        for seq in fresh:
            seq.timeline.dispatched = started
        batch.running.extend(picked)  # from here their adapters are protected from eviction
        usable = set()
        for adapter in dict.fromkeys(s.req.adapter for s in picked):
            group = [s for s in picked if s.req.adapter == adapter]
            if await self._make_usable(adapter, group):
                usable.update(group)
        joiners = [s for s in picked if s in usable and not s.over]
        if not joiners:
            return False
        new = [s for s in joiners if not s.dispatched]
        for seq in joiners:
            seq.dispatched = True
        if new:
            batch.stats.batches += 1
            batch.stats.prefilled_requests += len(new)
        return True

    def chunks(self) -> list[Seq]:
        """Prefilling rows and the chunk each computes this step, oldest first, within what the
        step's token budget leaves after one token per decoding row; the oldest always gets at
        least one block's worth, so prefills progress under any decode load."""
        budget = self._limits.max_num_batched_tokens - len(self._batch.decoding())
        budget = max(budget, self._batch.kv.block_size)
        chosen = []
        for seq in (s for s in self._batch.live() if s.target):
            n = min(seq.target - seq.prefilled, budget)
            if n <= 0:
                break
            seq.upto = seq.prefilled + n
            budget -= n
            chosen.append(seq)
        return chosen

    @property
    def _shadow_rows_below(self) -> int:
        """Shadows join a batch, and stay in it, only while it has fewer real rows than this: a
        row is not free on every device (on a CPU each one adds to the step's time)."""
        return max(1, self._limits.max_batch_size // SHADOW_SHARE)

    def _give_way(self) -> None:
        """Shadows run only on spare capacity: when more real requests wait than rows are free,
        no shadow waits; running shadows leave their rows to the real requests ready to take
        them, and leave the batch once it has _shadow_rows_below real rows. (Shadows also join
        only after the real requests ready, and only below that: admit.)"""
        batch = self._batch
        real = [s for s in batch.waiting if not s.req.shadow]
        live = batch.live()
        room = self._limits.max_batch_size - len(live)
        if sum(not s.req.shadow for s in live) >= self._shadow_rows_below:
            for seq in [s for s in live if s.req.shadow]:
                batch.shed(seq)
            room = self._limits.max_batch_size - len(batch.live())
        if len(real) <= room:
            return
        for seq in [s for s in batch.waiting if s.req.shadow]:
            batch.shed(seq)
        short = sum(self._reads.ready(s.req.adapter) for s in real) - room
        for seq in [s for s in reversed(batch.live()) if s.req.shadow][:max(short, 0)]:
            batch.shed(seq)

    def _one_prefill_per_prompt(self, picked: list[Seq]) -> list[Seq]:
        """Newcomers with the same adapter version and prompt as a row still prefilling, or as one
        picked before them (a request's n choices), wait for it: once its prefill publishes the
        prompt's blocks they join sharing them (the prefix cache) instead of computing it again."""
        kv = self._batch.kv
        if not kv.prefix_caching:
            return picked
        busy = {(s.req.adapter, s.req.prompt_ids) for s in self._batch.live() if s.target}
        out = []
        for seq in picked:
            key = (seq.req.adapter, seq.req.prompt_ids)
            shares = not seq.dispatched and not seq.scoring and len(seq.req.prompt_ids) > kv.block_size
            if shares and key in busy:
                continue
            busy.add(key)
            out.append(seq)
        return out

    def _take_blocks(self, picked: list[Seq]) -> list[Seq]:
        """KV blocks for the picked requests, in order, up to the first that does not fit (it and
        those after it wait: a big request is not overtaken forever by small ones)."""
        admitted = []
        for seq in picked:
            # Prompt logprobs need every prompt position computed: no shared prefix for them.
            seq.table = self._batch.kv.admit(prefix_key(seq.req.adapter), seq.context, seq.req.token_budget,
                                             count=not seq.dispatched, share=not seq.scoring)
            if seq.table is None:
                break
            if not seq.dispatched:  # a resumed sequence's hits are its own re-published blocks
                seq.cached_tokens = min(seq.table.cached_tokens, len(seq.req.prompt_ids))
            seq.target, seq.prefilled = len(seq.context), seq.table.cached_tokens
            admitted.append(seq)
        return admitted

    async def _make_usable(self, adapter: AdapterRef, group: list[Seq]) -> bool:
        """Attach `adapter` for `group`; on failure they go back to waiting, fall back or fail."""
        batch = self._batch
        started = self._clock()
        try:
            moved = await self._tiers.to_vram(adapter)
        except NoRoom as exc:
            batch.requeue(group)
            if any(s.req.adapter != adapter for s in batch.live()):
                batch.deferred.add(adapter)  # the batch's other adapters fill VRAM: wait for rows to leave
            else:
                self._completions.fail_or_fallback(group, exc)
            return False
        except LoraServeError as exc:
            batch.requeue(group)
            self._completions.fail_or_fallback(group, exc)  # fallen-back requests join a later round
            return False
        loaded = self._clock()
        cold = self._reads.take(adapter)
        found_in = Tier.DISK if cold is not None else moved.found_in
        fetched = cold.fetched if cold is not None else moved.fetched
        source = Tier.REMOTE if fetched is not None else found_in
        entry = self._tiers.cache.entries.get(adapter)
        fresh = [s for s in group if not s.dispatched]
        for seq in fresh:
            seq.load_source = source
            t = seq.timeline
            t.load_ms = moved.ms + (cold.ms if cold is not None else 0.0)
            seq.cost.adapter_load_ms = t.load_ms / len(fresh)  # one load, made for all of them
            t.load_started, t.load_ended = (cold.started if cold is not None else started), loaded
            t.load_shared = cold is not None and cold.started < t.enqueued
            t.load_bytes = entry.bytes if entry else 0
            t.fetch_bytes, t.fetch_ms = (fetched.bytes, fetched.seconds * 1e3) if fetched is not None else (0, 0.0)
            self._tiers.record_use(adapter, found_in)
        if fresh:
            self._observer.adapter_ready(adapter, source, fresh[0].timeline.load_ms)
        return True
