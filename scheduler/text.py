"""Stop sequences and stream-safe text boundaries over the decoded generated text."""

from __future__ import annotations

# Decoders emit U+FFFD for a multi-byte character whose bytes are not all out yet.
_INCOMPLETE = "\ufffd"


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index where the earliest stop sequence begins at or after `start`, or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits, default=-1)


def stable_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be streamed: never a trailing partial character, nor a
    suffix that could still grow into a stop sequence (it would have to be taken back)."""
    end = len(text.rstrip(_INCOMPLETE))
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                held = max(held, k)
                break
    return end - held
