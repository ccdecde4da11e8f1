"""What the scheduler needs from a model engine (implemented by runner.engine).

The engine keeps no batch: every step receives its rows, whole, from the scheduler, whose row
list is the only truth about what runs. A step either returns one result per row or raises,
having changed nothing another row depends on (it writes only into its own rows' KV slots, at
positions their lengths do not cover yet, in the KV blocks its rows' tables list), so the
scheduler may retry any subset of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from loraserve.scheduler.errors import LoraServeError
from loraserve.scheduler.tiers import TierEngine
from loraserve.scheduler.types import AdapterRef, ResponseFormat, SamplingParams, TokenLogprob


@dataclass(frozen=True, eq=False)
class Row:
    """One sequence in one step. Prefill feeds `context[cached:]`; decode feeds `generated[-1]`."""

    seq_id: int
    adapter: AdapterRef
    blocks: tuple[int, ...]
    """The row's KV block table: position p sits in blocks[p // block_size] (scheduler.blocks)."""
    prompt_ids: tuple[int, ...]
    generated: Sequence[int]
    """Tokens produced so far (the scheduler's own list: read, never changed, by the engine)."""
    sampling: SamplingParams
    """Sampled rows always carry a seed (the scheduler draws one when the caller gave none)."""
    cached: int = 0
    """Prefill: leading context positions whose keys the blocks already hold (a shared prefix, or
    earlier chunks): not computed again."""
    upto: int = 0
    """Prefill: the end of the context chunk this step computes (0: the whole context). A step
    that stops short of the context's end still returns a token, which the scheduler ignores."""
    prefill: bool = False
    """Engine.step: this row computes the chunk [cached, upto) of its context; else it decodes."""
    min_new_tokens: int = 0
    """While fewer tokens than this are generated, the row's EOS tokens are never chosen."""
    logprobs: int | None = None
    """Return the chosen token's logprob and this many alternatives (None: nothing)."""
    prompt_logprobs: int | None = None
    """Prefill: return the logprob of each prompt token this chunk predicts, and this many
    alternatives (None: nothing)."""
    response_format: ResponseFormat | None = None
    """The chosen token keeps `generated` + token a prefix of JSON valid under this format."""

    @property
    def context(self) -> tuple[int, ...]:
        """What a prefill computes: the prompt, and the tokens generated before a preemption."""
        return (*self.prompt_ids, *self.generated)

    @property
    def fed(self) -> tuple[int, ...]:
        """What this prefill step computes."""
        return self.context[self.cached:self.upto or None]

    @property
    def length(self) -> int:
        """Decode: tokens already in this row's KV blocks."""
        return len(self.prompt_ids) + len(self.generated) - 1 if self.generated else 0


@dataclass(frozen=True)
class StepResult:
    """The token a row produced this step, or the row's own error."""

    seq_id: int
    token_id: int = -1
    error: LoraServeError | None = None
    logprob: TokenLogprob | None = None
    """The chosen token's, when the row asked for logprobs."""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    """Prefill with prompt_logprobs: those of the prompt positions this chunk predicts, in order."""


@dataclass(frozen=True)
class TextJob:
    """A row's newest token to turn into text (Engine.detokenize, after its step). `ids` is the
    row's generated tail from where its text's context starts, the new token last; `ids[:read]`
    is text already returned."""

    seq_id: int
    ids: tuple[int, ...]
    read: int
    position: int
    """The new token's index among the row's generated tokens."""


@dataclass(frozen=True)
class Text:
    """A TextJob's result: `text` is final; `held` is decoded but may still change (an incomplete
    character), added only if the row ends here; ids[prefix:read] is the text's context now."""

    text: str
    held: str
    prefix: int
    read: int


class Engine(TierEngine, Protocol):
    """Runs steps over the rows it is given. Adapter moves (TierEngine) are directed by scheduler.tiers."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def kv_blocks(self) -> int:
        """Blocks in the KV pool (0 .. kv_blocks-1)."""

    @property
    def kv_block_size(self) -> int:
        """Token positions per block."""

    async def scrub(self, blocks: Sequence[int]) -> None:
        """Zero `blocks` (a failed sequence held them) before they are handed out again."""

    async def prefill(self, rows: Sequence[Row]) -> list[StepResult]:
        """Fill each row's KV blocks with its context; returns each row's next token."""

    async def step(self, rows: Sequence[Row]) -> list[StepResult]:
        """Rows that prefill a chunk (Row.prefill) and rows that decode, in one step; one result
        per row, in order. Like prefill and decode, it changes only its own rows' blocks."""

    async def decode(self, rows: Sequence[Row]) -> list[StepResult]:
        """One token per row."""

    async def detokenize(self, jobs: Sequence[TextJob]) -> list[Text | LoraServeError]:
        """Each job's text, or its own error; off the thread that runs the steps, so the
        scheduler overlaps it with the next step."""
