"""What the store refuses, and why: one family of errors for every kind of store."""

from __future__ import annotations


class StoreError(Exception):
    """A lifecycle operation refused, with the reason people need to fix it."""


class AmbiguousId(StoreError):
    """An id names more than one adapter (possible only in a store edited by hand)."""


class IndexInvalid(StoreError):
    """registry.json is not an index anything may be served or decided from; the message says why."""


class IndexMoved(StoreError):
    """The index changed between reading it and writing the change decided on it (a lost
    compare-and-swap): the change is decided again on the new index."""


MOVES = 20
"""How many times a change is decided again on an index that moved under it before giving up."""
