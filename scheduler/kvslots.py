"""Which KV pool slot each running sequence owns: pure bookkeeping, no torch.

A sequence takes a slot when it is admitted and gives it back when it leaves, so admission is
decided here against free slots (every slot holds a whole sequence of the model's context, so
an admitted request can never run out of KV room mid-generation; a full pool means waiting).
Lowest slots are handed out first, which keeps a batch's slots consecutive more often than not
(the engine then reads them as one view instead of gathering them).
"""

from __future__ import annotations

import heapq


class KVSlots:
    def __init__(self, slots: int):
        self.total = slots
        self._free = list(range(slots))

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        return heapq.heappop(self._free)

    def give_back(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
