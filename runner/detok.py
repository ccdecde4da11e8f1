"""Incremental detokenisation: each step decodes a few tokens, never a row's whole output again.

`prefix` and `read` index the row's generated ids: ids[prefix:read] is text already returned,
kept as context because decoders may render a token differently at the start of a string
(leading spaces) or need the next bytes to finish a character. New text is returned only when
it no longer ends in U+FFFD, the decoders' mark for a character whose bytes are not all out.
"""

from __future__ import annotations

from typing import Sequence

_INCOMPLETE = "\ufffd"


def decode_new(tokenizer, ids: Sequence[int], prefix: int, read: int) -> tuple[str, str, int, int]:
    """-> (new text, text held back, new prefix, new read). The held-back text (a character
    still incomplete, or a real U+FFFD) is what a sequence ending now must still add."""
    before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
    after = tokenizer.decode(ids[prefix:], skip_special_tokens=True)
    if len(after) > len(before) and not after.endswith(_INCOMPLETE):
        return after[len(before):], "", read, len(ids)
    return "", after[len(before):], prefix, read
