"""The block manager alone (scheduler/blocks.py): pure bookkeeping, milliseconds, no torch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from loraserve.scheduler.blocks import BlockManager

SIZE = 4


def test_a_sequence_takes_blocks_for_its_prefill_and_first_decode_and_grows_one_at_a_time():
    m = BlockManager(10, SIZE)
    t = m.admit("a@1", range(7))  # 7 positions + the first decode's = 8: two blocks
    assert len(t.blocks) == 2 and m.free == 8 and m.used == 2
    assert m.grow(t, 8) and len(t.blocks) == 2
    assert m.grow(t, 9) and len(t.blocks) == 3
    m.release(t)
    assert m.free == 10 and m.used == 0 and t.blocks == []


def test_admission_and_growth_stop_at_the_free_blocks():
    m = BlockManager(4, SIZE)
    a = m.admit("a@1", range(10))  # 3 blocks
    assert m.admit("b@1", range(4)) is None  # needs 2
    b = m.admit("b@1", range(2))
    assert b is not None and m.free == 0
    assert not m.grow(b, 5)  # no block left: the scheduler preempts someone
    m.release(a)
    assert m.grow(b, 5)


def test_a_prefix_is_shared_only_for_the_same_adapter_version_and_tokens():
    m = BlockManager(20, SIZE)
    prompt = list(range(100, 111))  # 11 tokens: two full blocks
    first = m.admit("legal@1", prompt)
    assert first.cached_tokens == 0
    m.publish(first, "legal@1", prompt)
    again = m.admit("legal@1", prompt + [7])
    assert again.cached_tokens == 8 and again.blocks[:2] == first.blocks[:2]
    assert m.refs(first.blocks[0]) == 2
    assert again.blocks[2] not in first.blocks  # its own tail: a shared block is never written
    assert m.admit("legal@2", prompt).cached_tokens == 0  # another version computes its own keys
    assert m.admit("medical@1", prompt).cached_tokens == 0
    assert m.admit("legal@1", [1] + prompt[1:]).cached_tokens == 0  # a block's digest covers all before it
    assert m.prefix.hit_tokens == 8


def test_the_last_token_is_always_computed_by_the_sequence_itself():
    m = BlockManager(20, SIZE)
    prompt = list(range(8))  # exactly two blocks
    first = m.admit("a@1", prompt)
    m.publish(first, "a@1", prompt)
    again = m.admit("a@1", prompt)
    assert again.cached_tokens == 4  # the second block holds the last token: computed again, privately
    assert again.blocks[1] != first.blocks[1]


def test_freed_prefix_blocks_stay_findable_until_the_free_list_reuses_them_oldest_first():
    m = BlockManager(6, SIZE)
    prompt = list(range(9))
    t = m.admit("a@1", prompt)  # 3 blocks
    m.publish(t, "a@1", prompt)
    m.release(t)
    assert m.cached == 2 and m.free == 6
    hit = m.admit("a@1", prompt)
    assert hit.cached_tokens == 8
    m.release(hit)
    # Six fresh blocks: the never-used ones first, then the cached prefix gives its blocks up.
    filler = m.admit("b@1", range(23))
    assert len(filler.blocks) == 6 and m.cached == 0
    m.release(filler)
    assert m.admit("a@1", prompt).cached_tokens == 0


def test_blocks_a_failed_sequence_held_wait_to_be_zeroed_except_published_ones():
    m = BlockManager(6, SIZE)
    prompt = list(range(9))
    t = m.admit("a@1", prompt)
    m.publish(t, "a@1", prompt)
    shared = t.blocks[:2]
    m.release(t, clean=False)
    dirty = m.dirty()
    assert len(dirty) == 1 and dirty[0] not in shared and m.free == 5
    m.scrubbed(dirty)
    assert m.dirty() == [] and m.free == 6


def test_reserve_mode_promises_every_block_a_sequence_can_need():
    m = BlockManager(10, SIZE, prefix_caching=False, reserve=True)
    a = m.admit("a@1", range(3), reserve_tokens=3 + 20)  # 23 positions: 6 blocks, 1 held now
    assert len(a.blocks) == 1 and m.free == 4
    assert m.admit("b@1", range(3), reserve_tokens=3 + 20) is None
    b = m.admit("b@1", range(3), reserve_tokens=3 + 13)  # 4 blocks
    assert b is not None and m.free == 0
    assert m.grow(a, 23) and m.grow(b, 16)  # never refused: promised
    m.release(a)
    assert m.free == 6


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "grow", "release", "fail", "publish", "scrub"]),
                          st.integers(0, 5), st.integers(1, 30), st.sampled_from(["a@1", "b@1"])), max_size=60))
def test_books_stay_consistent_whatever_happens(ops):
    """No block is held by two sequences unless it is a published prefix (read-only), and every
    block is free, held or waiting to be zeroed, once."""
    m = BlockManager(24, SIZE)
    live: dict[int, tuple] = {}
    for op, slot, n, key in ops:
        prompt = [slot % 2] * n  # equal prompts for equal slot parity: prefixes do get shared
        if op == "admit" and slot not in live:
            t = m.admit(key, prompt)
            if t is not None:
                live[slot] = (t, key, prompt)
        elif slot in live:
            t, k, p = live[slot]
            if op == "grow":
                m.grow(t, len(t.blocks) * SIZE + 1)
            elif op == "publish":
                m.publish(t, k, p)
            elif op in ("release", "fail"):
                m.release(t, clean=op == "release")
                del live[slot]
        if op == "scrub":
            m.scrubbed(m.dirty())
        held: dict[int, int] = {}
        for t, _, _ in live.values():
            assert len(set(t.blocks)) == len(t.blocks)
            for b in t.blocks:
                held[b] = held.get(b, 0) + 1
        for b, count in held.items():
            assert m.refs(b) == count
            assert count == 1 or b in m._digest_of, "a private block in two tables"
        assert m.used == len(held) and m.used + m.free + len(m.dirty()) == m.total
        assert m.cached == sum(1 for b in m._free if b in m._digest_of)
