"""How a request ends: each step's tokens appended, its text decoded off the step's thread and
checked for stop sequences, then its Completion, or its error, or (where the fallback rule allows,
scheduler/fallback.py) a move to the base model."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from loraserve.scheduler.batch import Batch
from loraserve.scheduler.engine import Engine, StepResult, TextJob
from loraserve.scheduler.errors import GenerationFailed, LoraServeError, OutOfMemory
from loraserve.scheduler.fallback import carried, to_base
from loraserve.scheduler.seq import Detok, Seq
from loraserve.scheduler.text import find_stop, stable_length
from loraserve.scheduler.types import Completion, FinishReason

log = logging.getLogger(__name__)


def alone(exc: Exception) -> LoraServeError:
    """The error of a request whose step failed with no other row in it."""
    if isinstance(exc, OutOfMemory):
        return OutOfMemory(f"{exc.message}; the request does not fit even alone")
    if isinstance(exc, LoraServeError):
        return exc
    log.error("a step failed for one request alone", exc_info=exc)
    return GenerationFailed(f"generation failed: {type(exc).__name__}", error_type=type(exc).__name__)


class Completions:
    def __init__(self, engine: Engine, batch: Batch, clock: Callable[[], float]):
        self._engine = engine
        self._batch = batch
        self._clock = clock
        self.text: asyncio.Task | None = None
        """The last step's tokens being decoded into text."""
        self.service_s: float | None = None
        """Moving average, dispatch to finish."""

    def apply(self, results: list[tuple[Seq, StepResult]]) -> None:
        """Each row's token: appended, and the row ends on EOS or its length (it steps no more);
        the tokens' text is decoded off the step's thread (Engine.detokenize) while the next step
        runs, and applied before that step's tokens (settle_text)."""
        eos = self._engine.eos_token_ids
        jobs = []
        for seq, res in results:
            if seq.over:
                continue
            if res.error is not None:
                self.fail([seq], res.error)
                continue
            if seq.req.score_only:  # its prefill is the answer: the token it would start with is not
                self.finish(seq, "", FinishReason.LENGTH)
                continue
            seq.generated.append(res.token_id)
            if seq.req.logprobs is not None:
                seq.logprobs.append(res.logprob)
            seq.ending = (FinishReason.EOS if res.token_id in eos and not seq.req.ignore_eos else
                          FinishReason.LENGTH if seq.output_tokens >= seq.req.max_new_tokens else None)
            start = seq.detok.start
            jobs.append((seq, TextJob(seq.seq_id, tuple(seq.generated[start:]), seq.detok.read - start,
                                      len(seq.generated) - 1)))
        if jobs:
            self.text = asyncio.ensure_future(self._apply_text(jobs))

    async def settle_text(self) -> None:
        if self.text is not None:
            await self.text
            self.text = None  # only now: until its rows have finished, the scheduler is not idle

    async def _apply_text(self, jobs: list[tuple[Seq, TextJob]]) -> None:
        """Stop sequences are found in the text, so a row that meets one may have run one step
        past it: that step's token is dropped (the row is done by then) and its blocks freed."""
        try:
            texts = await self._engine.detokenize([job for _, job in jobs])
        except Exception as exc:  # the engine's own failure: these rows fail, the loop goes on
            log.exception("decoding the text of %d rows failed", len(jobs))
            texts = [alone(exc)] * len(jobs)
        for (seq, job), out in zip(jobs, texts, strict=True):
            if seq.over:
                continue
            if isinstance(out, LoraServeError):
                self.fail([seq], out)
                continue
            start, tokens = seq.detok.start, job.position + 1
            seq.detok = Detok(start + out.prefix, start + out.read)
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
                self.finish(seq, text[:cut], FinishReason.STOP_SEQUENCE)
            elif seq.ending is not None:
                self.finish(seq, text, seq.ending)
            else:
                seq.emit(text, stable_length(text, stops if stopping else ()), tokens)

    def finish(self, seq: Seq, text: str, reason: FinishReason) -> None:
        seq.emit(text, len(text), len(seq.generated))
        seq.done = True
        seq.timeline.finished = self._clock()
        self._batch.stats.completed += 1
        took = seq.timeline.finished - seq.timeline.dispatched
        self.service_s = took if self.service_s is None else 0.9 * self.service_s + 0.1 * took
        seq.events.put_nowait(Completion(
            request_id=seq.req.request_id, text=text, finish_reason=reason,
            input_tokens=len(seq.req.prompt_ids), output_tokens=seq.output_tokens,
            adapter=seq.req.adapter, load_source=seq.load_source,
            fallback_reason=seq.req.fallback_reason, fallback_from=seq.req.requested, timeline=seq.timeline,
            cost=seq.cost, cached_tokens=seq.cached_tokens, token_ids=tuple(seq.generated),
            logprobs=tuple(seq.logprobs) if seq.req.logprobs is not None else None,
            prompt_logprobs=tuple(seq.prompt_scores) if seq.wants_prompt_logprobs is not None else None,
        ))

    def fail(self, seqs: list[Seq], exc: LoraServeError) -> None:
        for seq in seqs:
            if not seq.over:
                seq.done = seq.suspect = True
                self._batch.stats.failed += 1
                seq.events.put_nowait(exc)

    def fail_or_fallback(self, seqs: list[Seq], exc: LoraServeError) -> None:
        """Requests the fallback rule lets go on move to the base model (and say so; those waiting
        stay in the queue); the rest fail with `exc`."""
        failing = []
        for seq in seqs:
            if carried(seq.req, seq.output_tokens):
                seq.req = to_base(seq.req, exc)
            else:
                failing.append(seq)
                if seq in self._batch.waiting:
                    self._batch.waiting.remove(seq)
        self.fail(failing, exc)
