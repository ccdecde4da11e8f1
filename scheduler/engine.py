"""What the scheduler needs from a model engine (implemented by runner.engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from scheduler.types import AdapterRef, LoadSource, SamplingParams


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


@dataclass(frozen=True)
class LoadInfo:
    source: LoadSource
    ms: float


class Engine(Protocol):
    """Runs one batch at a time: prefill starts it, decode advances the rows still kept."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def is_fetched(self, adapter: AdapterRef) -> bool:
        """Whether `adapter` can be attached without touching disk (in RAM, or already attached)."""

    async def fetch(self, adapter: AdapterRef) -> LoadInfo:
        """Read `adapter` from disk into RAM, off the compute thread; raises AdapterLoadFailed."""

    async def ensure_adapter(self, adapter: AdapterRef) -> LoadInfo:
        """Attach `adapter` for the next batch (fetching it first if needed); raises AdapterLoadFailed."""

    async def prefill(self, rows: Sequence[Row]) -> list[StepResult]:
        """Start a new batch from `rows`; returns each row's first token."""

    async def decode(self, keep: Sequence[int]) -> list[StepResult]:
        """Drop every row not in `keep` (freeing its cache), then produce one token per kept row."""

    async def release(self) -> None:
        """Free the current batch."""
