"""Hooks through which the server watches the scheduler (tracing, metrics) without the scheduler
knowing about either. Times are on the scheduler's clock."""

from __future__ import annotations

from typing import Protocol, Sequence

from loraserve.scheduler.types import AdapterRef, Tier


class Observer(Protocol):
    def batch_phase(self, phase: str, started: float, ended: float, adapter: AdapterRef,
                    request_ids: Sequence[str], steps: int) -> None:
        """A batch finished its `phase` ("prefill" or "decode", `steps` forward passes) for these requests."""

    def adapter_read(self, adapter: AdapterRef, ms: float) -> None:
        """An adapter was read from disk (a cold load)."""

    def adapter_ready(self, adapter: AdapterRef, source: Tier, ms: float) -> None:
        """A batch's adapter was made usable: found in `source`, taking `ms` in all."""


class NullObserver:
    def batch_phase(self, phase, started, ended, adapter, request_ids, steps) -> None:
        pass

    def adapter_read(self, adapter, ms) -> None:
        pass

    def adapter_ready(self, adapter, source, ms) -> None:
        pass
