"""Which KV pool blocks each sequence holds: pure bookkeeping, no torch (after nano-vllm's BlockManager).

The engine's pool is `total` blocks of `block_size` token positions. A sequence holds a block
table, its blocks in order (position p lives in table[p // block_size] at offset p % block_size).
Blocks are taken as a sequence grows: at admission for the tokens its prefill writes (plus
the position its first decode writes), then one more whenever a decode step crosses a block
boundary. When none is free the scheduler preempts a sequence (frees its blocks, re-prefills it
later), so a short request holds a few blocks, not a whole context.

`reserve=True` (deterministic engines) instead promises each sequence at admission every block
its prompt and max_new_tokens can need, so it is never preempted: a preemption re-prefills, and
a re-prefill computes keys in another shape than the decode steps did.

Prefix sharing (vLLM's automatic prefix caching): once a prefill has succeeded, its full blocks
are published under a chained digest of (adapter id@version, every token up to the block's end).
A later sequence whose prompt starts with the same tokens for the same adapter version takes
those blocks (reference-counted) instead of computing them. A published block is never written
again: only full blocks are shared and a sharer always computes at least its last token itself,
into a block of its own. Freed published blocks stay findable until the free list hands them out
again, oldest first, so a hot system prompt survives while colder blocks are reused.

A block a failed sequence held may hold non-finite values; it is not handed out again until the
engine has zeroed it (`dirty`, then `scrubbed`), because a masked NaN still poisons attention.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

_ROOT = b""


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    """Tokens at the start whose keys a shared prefix already holds (the prefill skips them)."""
    promised: int = 0
    """reserve mode: blocks still promised to this sequence beyond those it holds."""
    digests: list[bytes] = field(default_factory=list)
    """Chained digests of the full blocks published or taken from the cache so far."""


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    """Prompt tokens looked up at admission."""
    hit_tokens: int = 0
    """Of those, tokens whose keys were taken from shared blocks."""


class BlockManager:
    def __init__(self, total: int, block_size: int, prefix_caching: bool = True, reserve: bool = False):
        if total < 1 or block_size < 1:
            raise ValueError("a block pool needs at least one block of at least one token")
        self.total, self.block_size = total, block_size
        self.prefix_caching, self.reserve = prefix_caching, reserve
        self._refs = [0] * total
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(total))  # oldest first
        self._digest_of: dict[int, bytes] = {}  # published block -> its digest
        self._block_of: dict[bytes, int] = {}  # digest -> published block
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # published block -> its tokens (checked on a hit)
        self._promised = 0
        self._cached_free = 0  # free blocks still published (kept as a count: metrics read it from another thread)
        self._dirty: list[int] = []
        self.prefix = PrefixStats()

    # -- reading ------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def free(self) -> int:
        """Blocks a sequence may take now (free ones, cached or not, less those promised)."""
        return len(self._free) - self._promised

    @property
    def used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.total - len(self._free) - len(self._dirty)

    @property
    def cached(self) -> int:
        """Free blocks that still hold a published prefix (taken back on a hit)."""
        return self._cached_free

    def refs(self, block: int) -> int:
        return self._refs[block]

    # -- admission ----------------------------------------------------------
    def _chain(self, key: str, tokens: Sequence[int]) -> Iterator[tuple[bytes, tuple[int, ...]]]:
        """(digest, tokens) of each full block of `tokens`, lazily; a digest covers the adapter
        version and every token before the block's end, so equal digests mean equal keys."""
        parent, size = key.encode(), self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            chunk = tuple(tokens[start:start + size])
            parent = hashlib.blake2b(parent + array("q", chunk).tobytes(), digest_size=16).digest()
            yield parent, chunk

    def _hits(self, key: str, tokens: Sequence[int]) -> list[tuple[int, bytes]]:
        """Published blocks holding a prefix of `tokens`, leaving at least the last token to compute."""
        if not self.prefix_caching:
            return []
        hits = []
        for digest, chunk in self._chain(key, tokens[:len(tokens) - 1]):
            block = self._block_of.get(digest)
            if block is None or self._tokens_of[block] != chunk:
                break
            hits.append((block, digest))
        return hits

    def admit(self, key: str, tokens: Sequence[int], reserve_tokens: int = 0, count: bool = True,
              share: bool = True) -> BlockTable | None:
        """Blocks for a sequence whose prefill writes `tokens` (and whose first decode writes one
        position more), or None when they are not free. `key` is the adapter's id@version: another
        adapter or version never shares a block. `reserve_tokens`: the most tokens it can ever hold
        (reserve mode only). `count`: whether the lookup counts in the prefix statistics (not when
        a preempted sequence comes back). `share`: whether it may take shared prefix blocks."""
        need = self.blocks_for(len(tokens) + 1)
        if need - (len(tokens) - 1) // self.block_size > self.free:
            return None  # not even with every full block shared: no need to hash a long prompt
        hits = self._hits(key, tokens) if share else []
        reused_free = sum(1 for block, _ in hits if self._refs[block] == 0)
        fresh = need - len(hits)
        promise = max(self.blocks_for(reserve_tokens) - need, 0) if self.reserve else 0
        if fresh + reused_free + promise > self.free:
            return None
        table = BlockTable(cached_tokens=len(hits) * self.block_size)
        for block, digest in hits:
            if self._refs[block] == 0:
                del self._free[block]
                self._cached_free -= 1
            self._refs[block] += 1
            table.blocks.append(block)
            table.digests.append(digest)
        table.blocks += [self._take() for _ in range(fresh)]
        table.promised = promise
        self._promised += promise
        if count:
            self.prefix.queried_tokens += len(tokens)
            self.prefix.hit_tokens += table.cached_tokens
        return table

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        digest = self._digest_of.pop(block, None)
        if digest is not None:  # the oldest cached prefix gives its block up
            del self._block_of[digest], self._tokens_of[block]
            self._cached_free -= 1
        self._refs[block] = 1
        return block

    # -- growth -------------------------------------------------------------
    def grow(self, table: BlockTable, tokens: int) -> bool:
        """Room for `tokens` positions in `table`; False when a block is needed and none is free
        (never in reserve mode: the blocks were promised)."""
        while len(table.blocks) * self.block_size < tokens:
            if table.promised:
                table.promised -= 1
                self._promised -= 1
            elif self.free < 1:
                return False
            table.blocks.append(self._take())
        return True

    def publish(self, table: BlockTable, key: str, tokens: Sequence[int]) -> None:
        """After a successful prefill of `tokens`: its full blocks become findable by later prompts."""
        if not self.prefix_caching:
            return
        chain = list(self._chain(key, tokens))
        for i in range(len(table.digests), len(chain)):
            digest, chunk = chain[i]
            block = table.blocks[i]
            table.digests.append(digest)
            if digest in self._block_of:  # computed twice at once: the first copy stays the shared one
                continue
            self._block_of[digest], self._digest_of[block], self._tokens_of[block] = block, digest, chunk

    # -- leaving ------------------------------------------------------------
    def release(self, table: BlockTable, clean: bool = True) -> None:
        """The sequence leaves (finished, cancelled, preempted: clean; failed: its blocks may hold
        non-finite values, so they wait for the engine to zero them)."""
        self._promised -= table.promised
        for block in reversed(table.blocks):  # the tail is reused before the prefix it extends
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._digest_of:  # a published block is never written again: clean
                self._free[block] = None
                self._cached_free += 1
            elif clean:
                self._free[block] = None
            else:
                self._dirty.append(block)
        table.blocks, table.digests, table.promised, table.cached_tokens = [], [], 0, 0

    def dirty(self) -> list[int]:
        """Blocks to zero before they are handed out again."""
        return list(self._dirty)

    def scrubbed(self, blocks: Sequence[int]) -> None:
        done = set(blocks)
        self._dirty = [b for b in self._dirty if b not in done]
        for block in blocks:
            self._free[block] = None
