"""Label values with bounded cardinality, for metrics labelled by adapter or by client.

Every value of a label multiplies the series of every metric that carries it: ten thousand
adapters times six histograms of sixteen series would sink a Prometheus. BoundedLabels hands
out at most `n` values of their own; every other key shares OTHER.

A key keeps its label for the life of the process, and the first `n` keys to ask get one.
Why not "the current top n by volume": a label that moved from one adapter to another would
split both adapters' counters across series (a rate() over the move is wrong, and increments
between the last scrape and the move are lost), and the cost counters must add up exactly.
Busy adapters are the ones most likely to be among the first to be asked for, and when they
were not, the OTHER share says so (the dashboard plots it and an alert watches it): raise
--metrics-adapter-labels. Exact per-request figures for every adapter are in the request log.
"""

from __future__ import annotations

OTHER = "_other"
"""No adapter name starts with "_" (registry.passport.NAME), so no adapter can be mistaken for it."""


class BoundedLabels:
    def __init__(self, n: int):
        self.n = n
        self._given: set[str] = set()

    def __call__(self, key: str) -> str:
        """`key`'s label value: itself while labels remain or once it has one, else OTHER."""
        if key in self._given:
            return key
        if len(self._given) < self.n:
            self._given.add(key)
            return key
        return OTHER
