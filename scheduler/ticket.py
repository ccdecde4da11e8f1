"""What submit hands back: a request's events (text deltas, then its Completion or its error)."""

from __future__ import annotations

from typing import AsyncIterator, Callable

from loraserve.scheduler.seq import Seq
from loraserve.scheduler.types import Completion, TextDelta


def _merge_deltas(items: list) -> list:
    merged: list = []
    for item in items:
        if merged and isinstance(item, TextDelta) and isinstance(merged[-1], TextDelta):
            last = merged[-1]
            merged[-1] = TextDelta(last.text + item.text, last.token_ids + item.token_ids,
                                   last.logprobs + item.logprobs)
        else:
            merged.append(item)
    return merged


class Ticket:
    """A submitted request: iterate for TextDelta items then one Completion."""

    def __init__(self, seq: Seq, cancel: Callable[[Seq], None]):
        self._seq, self._cancel = seq, cancel

    async def events(self) -> AsyncIterator[TextDelta | Completion]:
        """Deltas already waiting are merged into one, so a slow reader gets fewer, larger messages."""
        queue = self._seq.events
        while True:
            items = [await queue.get()]
            items += [queue.get_nowait() for _ in range(queue.qsize())]
            for item in _merge_deltas(items):
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return

    async def result(self) -> Completion:
        async for item in self.events():
            if isinstance(item, Completion):
                return item
        raise AssertionError("event stream ended without a completion")

    def cancel(self) -> None:
        """Withdraw the request: a queued one leaves the queue, a running one leaves its batch
        before the next decode step. A finished one is unaffected."""
        self._cancel(self._seq)
