"""What the steps took, for the requests' timelines and the observer's batch phases: each step's
time added to its rows' prefill or decode, one prefill phase per step that prefilled, and one
decode phase per stretch of steps with the same decoding rows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from loraserve.scheduler.engine import StepResult
from loraserve.scheduler.observer import Observer
from loraserve.scheduler.seq import Seq
from loraserve.scheduler.types import BASE, AdapterRef


def _adapter_of(seqs: list[Seq] | tuple[Seq, ...]) -> AdapterRef:
    """The batch phase's adapter for its span: the common one, else BASE standing for "mixed"."""
    adapters = {s.req.adapter for s in seqs}
    return adapters.pop() if len(adapters) == 1 else replace(BASE, id="mixed")


@dataclass(frozen=True)
class Stretch:
    """Steps in a row that decoded the same sequences."""

    started: float
    seqs: tuple[Seq, ...]
    steps: int = 0

    @property
    def ids(self) -> list[int]:
        return [s.seq_id for s in self.seqs]


class StepClock:
    def __init__(self, observer: Observer, clock: Callable[[], float]):
        self._observer = observer
        self._clock = clock
        self._stretch: Stretch | None = None

    def decoding(self, seqs: list[Seq]) -> None:
        """The next step decodes `seqs`: the current stretch goes on if they are its rows, else it
        ends and theirs begins."""
        if self._stretch is None or self._stretch.ids != [s.seq_id for s in seqs]:
            self.close()
            if seqs:
                self._stretch = Stretch(self._clock(), tuple(seqs))

    def stepped(self, decoding: list[Seq], chunks: list[Seq], results: list[tuple[Seq, StepResult]],
                started: float, ended: float) -> None:
        """A step from `started` to `ended` decoded `decoding` and prefilled `chunks`; `results`
        are the rows it served."""
        if self._stretch is not None:
            self._stretch = replace(self._stretch, steps=self._stretch.steps + 1)
        for seq in decoding:
            seq.timeline.decode_ms += (ended - started) * 1e3
        for seq in chunks:
            seq.timeline.prefill_ms += (ended - started) * 1e3
        served = [s for s, _ in results if s.target]
        if served:
            self._observer.batch_phase("prefill", started, ended, _adapter_of(served),
                                       [s.req.request_id for s in served], 1)

    def close(self) -> None:
        """The current stretch's decode phase, if it stepped."""
        stretch, self._stretch = self._stretch, None
        if stretch is not None and stretch.steps:
            self._observer.batch_phase("decode", stretch.started, self._clock(), _adapter_of(stretch.seqs),
                                       [s.req.request_id for s in stretch.seqs], stretch.steps)
