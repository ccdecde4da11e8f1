"""What the scheduler needs from a model engine (implemented by runner.engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from scheduler.tiers import TierEngine
from scheduler.types import AdapterRef, SamplingParams


@dataclass(frozen=True)
class Row:
    """One sequence entering a batch."""

    seq_id: int
    adapter: AdapterRef
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class StepResult:
    """The token a sequence produced this step, and its whole generated text so far."""

    seq_id: int
    token_id: int
    text: str


class Engine(TierEngine, Protocol):
    """Runs one batch at a time: prefill starts it, decode advances the rows still kept.
    Adapter moves (TierEngine) are directed by scheduler.tiers."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    async def prefill(self, rows: Sequence[Row], keep: Sequence[int]) -> list[StepResult]:
        """Drop every running row not in `keep` (its adapter may be gone already), then add
        `rows` to the batch; returns each new row's first token."""

    async def decode(self, keep: Sequence[int]) -> list[StepResult]:
        """Drop every row not in `keep` (freeing its cache), then produce one token per kept row."""

    async def release(self) -> None:
        """Free the current batch."""
