"""One request's state in the scheduler, from submit to its completion: what it generated, its
KV blocks while it runs, where its prefill is, and the events its Ticket reads."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from loraserve.scheduler.blocks import BlockTable
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import (AdapterRef, Cost, FinishReason, GenerationRequest, TextDelta, Tier, Timeline,
                             TokenLogprob)


def prefix_key(adapter: AdapterRef) -> str:
    """Keys computed under one adapter version's weights are shared only with the same weights."""
    return f"{adapter.key}#{adapter.sha256}"


@dataclass(frozen=True)
class Detok:
    """Incremental detokenisation offsets into a sequence's `generated`."""

    start: int = 0
    """Where the tokens its next text is decoded in context of begin."""
    read: int = 0
    """Up to where their text has been returned."""


@dataclass(eq=False)
class Seq:
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
    detok: Detok = Detok()
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

    @property
    def over(self) -> bool:
        """Finished, failed or cancelled: nothing more happens to it."""
        return self.done or self.cancelled

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
