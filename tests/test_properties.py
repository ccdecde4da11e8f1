"""Property and stateful tests (hypothesis) for the scheduler's pure policies: batch selection,
joining and fair order, stop finding, the KV block bookkeeping and the adapter cache's eviction
plans. Each asserts what the function's docstring promises, over inputs hypothesis draws and shrinks."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.cache import AdapterCache, Budgets, Demote, Entry, NoRoom, plan_admit, usage
from loraserve.scheduler.policy import BatchLimits, fair_order, select_batch, should_join
from loraserve.scheduler.text import find_stop, stable_length
from loraserve.scheduler.types import AdapterRef, GenerationRequest, Tier

FAST = settings(max_examples=100, deadline=None)
ADAPTERS = [AdapterRef(name, "1", f"/store/{name}") for name in "abc"]


@st.composite
def requests(draw, max_size: int = 12) -> list[GenerationRequest]:
    """A queue, oldest first: few adapters and clients so that they repeat."""
    out = []
    for i in range(draw(st.integers(0, max_size))):
        out.append(GenerationRequest(f"r{i}", draw(st.sampled_from(ADAPTERS)),
                                     tuple(range(draw(st.integers(1, 40)))), draw(st.integers(1, 40)),
                                     client=draw(st.sampled_from("xyz"))))
    return out


limits = st.builds(BatchLimits, max_batch_size=st.integers(1, 8), max_batch_tokens=st.integers(1, 200),
                   policy=st.sampled_from(("mixed", "grouped")))


def _tokens(reqs) -> int:
    return sum(r.token_budget for r in reqs)


# -- select_batch ------------------------------------------------------------
@FAST
@given(requests(), requests(max_size=6), limits)
def test_a_batch_keeps_arrival_order_room_and_the_token_budget(waiting, running, lim):
    chosen = select_batch(waiting, lim, running)
    assert chosen == sorted(set(chosen))  # arrival order, within a client too
    assert all(0 <= i < len(waiting) for i in chosen)
    assert len(chosen) <= max(lim.max_batch_size - len(running), 0)
    joined = [waiting[i] for i in chosen]
    if (running and joined) or len(joined) > 1:  # only an empty batch's first request may stand over it alone
        assert _tokens(running) + _tokens(joined) <= lim.max_batch_tokens
    if not running and waiting and lim.max_batch_size > 0:
        assert chosen[:1] == [0]  # an empty batch always takes the oldest


@FAST
@given(requests(), requests(max_size=6), limits)
def test_a_request_is_skipped_only_for_the_budget_or_another_adapter(waiting, running, lim):
    chosen = select_batch(waiting, lim, running)
    room = lim.max_batch_size - len(running)
    adapter = running[0].adapter if running else (waiting[0].adapter if waiting else None)
    tokens = _tokens(running)
    for i, req in enumerate(waiting):
        if len([c for c in chosen if c < i]) >= room:
            assert i not in chosen
            continue
        if lim.policy == "grouped" and req.adapter != adapter:
            assert not [c for c in chosen if c > i], "a grouped batch takes nobody younger than another adapter's"
            break
        if i in chosen:
            tokens += req.token_budget
        else:
            assert tokens + req.token_budget > lim.max_batch_tokens


@FAST
@given(requests(), requests(max_size=6), limits.filter(lambda lim: lim.policy == "grouped"))
def test_a_grouped_batch_serves_one_adapter(waiting, running, lim):
    running = [r for r in running if not running or r.adapter == running[0].adapter]
    joined = [waiting[i] for i in select_batch(waiting, lim, running)]
    assert len({r.adapter for r in running + joined}) <= 1


# -- should_join ---------------------------------------------------------------
@FAST
@given(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20), st.floats(0, 1), limits)
def test_newcomers_join_at_once_when_idle_or_old_enough(ready, free_slots, running, wait_s, lim):
    joins = should_join(ready, free_slots, running, wait_s, lim)
    if ready == 0 or free_slots == 0:
        assert not joins
    elif running == 0 or wait_s >= lim.join_delay_s or ready >= max(1, free_slots // 2):
        assert joins
    else:
        assert not joins
        assert should_join(ready, free_slots, running, lim.join_delay_s, lim)  # waiting longer lets them in


# -- fair_order ----------------------------------------------------------------
@FAST
@given(requests(), requests(max_size=6),
       st.dictionaries(st.sampled_from("xyz"), st.floats(0, 100, allow_nan=False), max_size=3))
def test_fair_order_is_a_permutation_where_clients_take_turns(waiting, running, last_admitted):
    order = fair_order(waiting, running, last_admitted)
    assert sorted(order) == list(range(len(waiting)))
    turn, held = {}, {}
    for r in running:
        held[r.client] = held.get(r.client, 0) + 1
    for i, r in enumerate(waiting):
        turn[i] = held.get(r.client, 0)
        held[r.client] = turn[i] + 1
    keys = [(turn[i], last_admitted.get(waiting[i].client, float("-inf")), i) for i in order]
    assert keys == sorted(keys)  # lower turns first, then the client admitted least recently, then arrival
    for client in "xyz":
        mine = [i for i in order if waiting[i].client == client]
        assert mine == sorted(mine)  # a client's own requests keep their arrival order


# -- stop finding --------------------------------------------------------------
texts = st.text(alphabet="ab\n", max_size=16)
stop_sets = st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3).map(tuple)


@FAST
@given(texts, stop_sets, st.integers(0, 16))
def test_find_stop_finds_the_earliest_stop_at_or_after_start(text, stops, start):
    at = find_stop(text, stops, start)
    starts = [i for i in range(start, len(text)) if any(text.startswith(s, i) for s in stops)]
    assert at == (starts[0] if starts else -1)


@FAST
@given(texts, texts, stop_sets)
def test_streamed_text_is_never_taken_back_by_a_stop(text, more, stops):
    if find_stop(text, stops) >= 0:
        return  # the scheduler cuts at a stop found; only a stop-free text is streamed up to here
    n = stable_length(text, stops)
    assert 0 <= n <= len(text)
    at = find_stop(text + more, stops)
    assert at == -1 or at >= n, "a stop that completes later would begin inside text already streamed"
    if n < len(text):  # what is held back could still become a stop
        assert any(stop.startswith(text[n:]) and stop != text[n:] for stop in stops)


@FAST
@given(texts, st.integers(1, 3), stop_sets)
def test_a_trailing_partial_character_is_never_streamed(text, partial, stops):
    n = stable_length(text + "\ufffd" * partial, stops)
    assert n <= len(text)
    assert n == stable_length(text, stops)


# -- KV block bookkeeping ------------------------------------------------------
class BlockBookkeeping(RuleBasedStateMachine):
    """Sequences are admitted, prefilled (published), grown by decode steps and released, clean
    or failed; a model beside the manager records what each block holds, so a shared block can
    be checked to hold the very tokens (and adapter version) of the sequence that takes it."""

    @initialize(total=st.integers(1, 14), block_size=st.integers(1, 3), prefix=st.booleans(),
                reserve=st.booleans())
    def start(self, total, block_size, prefix, reserve):
        self.bm = BlockManager(total, block_size, prefix_caching=prefix, reserve=reserve)
        self.live: dict[int, dict] = {}  # id -> {table, key, tokens, limit, published}
        self.content: dict[int, tuple] = {}  # block -> (key, the tokens up to its end) its writer computed
        self.next_id = 0

    def _published(self, blocks) -> set[int]:
        """Of `blocks` (free now), those a later prompt can still find: taking one back counts a hit."""
        return {b for b in blocks if self.content.get(b, ("decode",))[0] != "decode"} & set(blocks)

    def _counts(self) -> tuple[int, int]:
        return self.bm.free, self.bm.used

    @rule(key=st.sampled_from(("a@1", "a@1", "a@2")), shared=st.sampled_from(((1, 2, 3, 4, 5, 6), (1, 2, 7, 7))),
          cut=st.integers(0, 6), tail=st.lists(st.integers(0, 9), max_size=3), extra=st.integers(0, 6))
    def admit(self, key, shared, cut, tail, extra):
        tokens = list(shared[:cut]) + tail or [0]  # prompts that often begin alike, so prefixes are shared
        before = self._counts()
        limit = len(tokens) + 1 + extra
        table = self.bm.admit(key, tokens, reserve_tokens=limit)
        if table is None:
            assert self._counts() == before, "a refused admission takes nothing"
            return
        size = self.bm.block_size
        assert len(table.blocks) == self.bm.blocks_for(len(tokens) + 1)
        assert table.cached_tokens % size == 0 and table.cached_tokens < len(tokens)
        shared = table.cached_tokens // size
        for i, block in enumerate(table.blocks):
            written = (key, tuple(tokens[:(i + 1) * size]))
            if i < shared:
                assert self.content.get(block) == written, "a shared block holds this prompt's keys"
            else:
                self.content[block] = written
        self.live[self.next_id] = {"table": table, "key": key, "tokens": tokens, "limit": limit,
                                   "published": False}
        self.next_id += 1

    @precondition(lambda self: any(not s["published"] for s in self.live.values()))
    @rule(data=st.data())
    def publish(self, data):
        seq = data.draw(st.sampled_from([s for s in self.live.values() if not s["published"]]))
        self.bm.publish(seq["table"], seq["key"], seq["tokens"])
        seq["published"] = True

    @precondition(lambda self: self.live)
    @rule(data=st.data(), steps=st.integers(1, 4))
    def grow(self, data, steps):
        seq = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        table, before = seq["table"], list(seq["table"].blocks)
        want = len(before) * self.bm.block_size + steps
        if self.bm.reserve:
            want = min(want, seq["limit"])
        if self.bm.grow(table, want):
            assert len(table.blocks) * self.bm.block_size >= want
            for block in table.blocks[len(before):]:
                self.content[block] = ("decode", block)  # a decode step's keys: nobody else's prefix
        else:
            assert not self.bm.reserve, "a reserved sequence's growth was promised"
            assert table.blocks[:len(before)] == before and self.bm.free == 0
            self.bm.release(table)  # the scheduler preempts it
            self.live = {k: s for k, s in self.live.items() if s is not seq}

    @precondition(lambda self: self.live)
    @rule(data=st.data(), clean=st.booleans())
    def release(self, data, clean):
        ident = data.draw(st.sampled_from(sorted(self.live)))
        table = self.live.pop(ident)["table"]
        blocks = [b for b in table.blocks if self.bm.refs(b) == 1]
        self.bm.release(table, clean=clean)
        assert table.blocks == [] and table.promised == 0
        if not clean:  # a failed row's last holder: its blocks wait to be zeroed unless published (never written)
            assert {b for b in blocks if b not in self.bm.dirty()} <= self._published(blocks)

    @rule()
    def scrub(self):
        self.bm.scrubbed(self.bm.dirty())
        assert self.bm.dirty() == []

    @invariant()
    def every_block_is_counted_once(self):
        promised = sum(s["table"].promised for s in self.live.values())
        assert self.bm.free + promised + self.bm.used + len(self.bm.dirty()) == self.bm.total
        assert self.bm.free >= 0 and 0 <= self.bm.cached <= self.bm.free + promised

    @invariant()
    def refcounts_match_the_live_tables(self):
        held: dict[int, int] = {}
        for seq in self.live.values():
            blocks = seq["table"].blocks
            assert len(blocks) == len(set(blocks))
            for block in blocks:
                held[block] = held.get(block, 0) + 1
        for block in range(self.bm.total):
            assert self.bm.refs(block) == held.get(block, 0) >= 0

    @invariant()
    def only_a_shared_prefix_is_held_twice(self):
        for seq in self.live.values():
            table = seq["table"]
            for block in table.blocks[len(table.digests):]:
                assert self.bm.refs(block) == 1, "a block a sequence still writes is its own"

    @invariant()
    def dirty_blocks_are_not_handed_out(self):
        dirty = self.bm.dirty()
        assert len(dirty) == len(set(dirty))
        held = {b for seq in self.live.values() for b in seq["table"].blocks}
        assert not held & set(dirty)


BlockBookkeeping.TestCase.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)
test_block_bookkeeping = BlockBookkeeping.TestCase


# -- eviction plans (scheduler.cache.plan_admit) --------------------------------
REFS = [AdapterRef(name, "1", f"/store/{name}") for name in "abcdefg"]


@st.composite
def cache_states(draw):
    """Entries within their budgets, an adapter to admit to RAM or VRAM, and those rows use."""
    entries = {}
    for i, ref in enumerate(draw(st.lists(st.sampled_from(REFS[:6]), unique=True, max_size=6))):
        tier = draw(st.sampled_from((Tier.RAM, Tier.VRAM, Tier.DISK)))
        entries[ref] = Entry(ref, tier, draw(st.integers(1, 40)), float(draw(st.integers(0, 9)) * 10 + i),
                             pinned=draw(st.booleans()),
                             host_bytes=draw(st.integers(1, 40)) if tier is Tier.VRAM else 0)
    budgets = Budgets(usage(entries.values(), Tier.RAM) + draw(st.integers(0, 40)),
                      usage(entries.values(), Tier.VRAM) + draw(st.integers(0, 40)))
    tier = draw(st.sampled_from((Tier.RAM, Tier.VRAM)))
    adapter = draw(st.sampled_from([r for r in REFS if r not in entries or entries[r].tier.value < tier.value]))
    protected = frozenset(draw(st.lists(st.sampled_from(list(entries) or REFS[:1]), max_size=3)))
    return entries, budgets, adapter, draw(st.integers(1, 60)), tier, protected


@FAST
@given(cache_states())
def test_an_eviction_plan_spares_rows_pins_and_keeps_both_budgets(state):
    entries, budgets, adapter, size, tier, protected = state
    try:
        actions = plan_admit(entries, budgets, adapter, size, tier, protected)
    except NoRoom:
        return
    touched = [a.adapter for a in actions]
    assert len(touched) == len(set(touched)), "each victim moves once"
    for action in actions:
        victim = entries[action.adapter]
        assert action.adapter not in protected and action.adapter != adapter, "never what a running row uses"
        assert not victim.pinned
        assert victim.tier is (Tier.VRAM if isinstance(action, Demote) else action.tier)
    cache = AdapterCache(budgets, {ref: replace(e) for ref, e in entries.items()})
    for action in actions:
        cache.apply(action)
    # The adapter's own RAM copy stays until its attach is done: the RAM budget holds beside it too.
    assert cache.used(Tier.RAM) <= budgets.ram or tier is Tier.RAM
    cache.place(adapter, tier, size, now=100.0)
    assert cache.used(tier) <= budgets.of(tier)
    assert cache.used(Tier.RAM) <= budgets.ram and cache.used(Tier.VRAM) <= budgets.vram
