"""Who waits and who runs: the one owner of the waiting queue, the running batch and the KV blocks
a running sequence holds. Every move between them (admission, requeue, preemption, shedding,
leaving) goes through here, so a sequence is in at most one of them and holds blocks only while
it runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.errors import Shed
from loraserve.scheduler.seq import Seq
from loraserve.scheduler.types import AdapterRef

log = logging.getLogger(__name__)


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


class Batch:
    """`settled`: called whenever a sequence left without the loop's help (cancelled while
    queued, shed), so that the scheduler can tell it has nothing left."""

    def __init__(self, kv: BlockManager, stats: SchedulerStats, settled: Callable[[], None]):
        self.kv = kv
        self.stats = stats
        self._settled = settled
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        """Admitted and not yet reaped: its live rows, and those that ended since the last reap."""
        self.deferred: set[AdapterRef] = set()
        """Adapters with no room in VRAM yet: retried once rows have left."""

    def live(self) -> list[Seq]:
        return [s for s in self.running if not (s.over or s.ending)]

    def decoding(self) -> list[Seq]:
        return [s for s in self.live() if not s.target]

    def empty(self) -> bool:
        return not self.waiting and not self.running

    def cancel(self, seq: Seq) -> None:
        if seq.over:
            return
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.stats.cancelled_in_queue += 1
            self._settled()
        else:
            self.stats.cancelled_running += 1

    def release(self, seq: Seq) -> None:
        """Its KV blocks go back; a failed row, or one a failed step held, may have left non-finite
        keys in them, so those wait to be zeroed."""
        if seq.table is not None:
            self.kv.release(seq.table, clean=not seq.suspect)
            seq.table = None

    def requeue(self, group: list[Seq]) -> None:
        """Admitted rows back to the queue's front, in order, their blocks freed."""
        for seq in group:
            self.running.remove(seq)
            self.release(seq)
        self.waiting[:0] = group

    def reap(self) -> None:
        """Rows that finished, failed or were cancelled leave: their KV slots are free again."""
        gone = [s for s in self.running if s.over or s.ending]
        if not gone:
            return
        for seq in gone:
            self.release(seq)
        self.running = self.live()
        self.deferred.clear()  # rows left: room may have been freed

    def make_room(self) -> None:
        """Every live row gets the block its next position needs; when none is free, the most
        recently admitted row is preempted (blocks freed, back to the queue's front, prefilled
        again later with what it generated), as vLLM does, until the older rows fit. A shadow
        is shed first, wherever it is."""
        live = self.live()
        for seq in list(live):
            if seq not in live:
                continue
            while not self.kv.grow(seq.table, seq.length):
                shadow = next((s for s in reversed(live) if s.req.shadow), None)
                victim = shadow or live.pop()
                if shadow is not None:  # shed, not preempted: nobody waits for its answer
                    live.remove(shadow)
                    self.shed(shadow)
                else:
                    self._preempt(victim)
                if victim is seq:
                    break

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.release(seq)
        self.waiting.insert(0, seq)
        self.stats.preemptions += 1
        log.info("request %s preempted after %d tokens: the KV pool is full; it resumes when blocks free up",
                 seq.req.request_id, len(seq.generated))

    def shed(self, seq: Seq) -> None:
        """A shadow dropped, queued or running, to make way for real requests."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.release(seq)
        seq.done = True
        self.stats.shadows_shed += 1
        seq.events.put_nowait(Shed(f"shadow request {seq.req.request_id} gave way to real traffic"))
        self._settled()
