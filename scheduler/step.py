"""Running one engine step: the rows built from the sequences, the engine called (a step that
raises is retried in halves), each row charged its share, and the result committed: a prefill
chunk moves its row's prefill on, and only a row whose result is its next token goes on to
completion (scheduler/completion.py). A failed step leaves no trace but the rows it fails."""

from __future__ import annotations

import logging
from typing import Callable

from loraserve.scheduler.batch import Batch
from loraserve.scheduler.completion import Completions, alone
from loraserve.scheduler.engine import Engine, StepResult
from loraserve.scheduler.errors import OutOfMemory
from loraserve.scheduler.seq import Seq, prefix_key

log = logging.getLogger(__name__)


def charge(seqs: list[Seq], ms: float) -> None:
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


class Steps:
    def __init__(self, engine: Engine, batch: Batch, completions: Completions, clock: Callable[[], float]):
        self._engine = engine
        self._batch = batch
        self._completions = completions
        self._clock = clock

    async def run(self, seqs: list[Seq]) -> list[tuple[Seq, StepResult]]:
        """One step over `seqs`. The engine keeps no batch and a failed step leaves no trace, so
        a step that raises is retried as two halves until the rows whose data fail it are alone:
        they fail (out of memory: the request does not fit even alone), every other row goes on
        as if they had never been there."""
        seqs = [s for s in seqs if not s.over]
        if not seqs:
            return []
        rows = [s.row() for s in seqs]
        try:
            t0 = self._clock()
            results = await self._engine.step(rows)
            charge(seqs, (self._clock() - t0) * 1e3)
            return list(zip(seqs, results, strict=True))
        except Exception as exc:
            for seq in seqs:  # what the failed step wrote into their blocks may not be finite
                seq.suspect = True
            if len(seqs) == 1:
                self._completions.fail(seqs, alone(exc))
                return []
            stats = self._batch.stats
            if isinstance(exc, OutOfMemory):
                stats.oom_splits += 1
            else:
                stats.failed_splits += 1
                log.warning("a step of %d rows failed (%s: %s); retrying its halves", len(seqs),
                            type(exc).__name__, exc)
            half = len(seqs) // 2
            return await self.run(seqs[:half]) + await self.run(seqs[half:])

    def commit(self, results: list[tuple[Seq, StepResult]], now: float) -> list[tuple[Seq, StepResult]]:
        """The rows whose result is their next token: a decoding row's always; a prefill chunk's
        once the chunk ends its context (its blocks then hold good keys: published, shareable)."""
        return [(seq, res) for seq, res in results if self._landed(seq, res, now)]

    def _landed(self, seq: Seq, res: StepResult, now: float) -> bool:
        if not seq.target or res.error is not None or seq.over:
            return True
        if res.prompt_logprobs:
            seq.score(seq.prefilled + 1, res.prompt_logprobs)
        seq.prefilled = seq.upto
        if seq.upto < seq.target:
            return False  # a chunk: its token is not the next one yet
        self._batch.kv.publish(seq.table, prefix_key(seq.req.adapter), seq.context[:seq.target])
        seq.target = 0
        if not seq.generated:
            seq.timeline.first_token = now
        return True

    async def scrub(self) -> None:
        """Blocks failed sequences held are zeroed before anyone is given them (scheduler/blocks.py)."""
        kv = self._batch.kv
        dirty = kv.dirty()
        if not dirty:
            return
        try:
            await self._engine.scrub(dirty)
        except Exception:  # they stay out of the free list; the next round tries again
            log.exception("zeroing %d KV blocks failed", len(dirty))
            return
        kv.scrubbed(dirty)
