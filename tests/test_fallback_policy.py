"""Property tests (hypothesis) for the one fallback rule (scheduler/fallback.py): what its
docstring promises, over every mode, passport policy and count of tokens produced."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from loraserve.scheduler.errors import AdapterIncompatible
from loraserve.scheduler.fallback import carried, falls_back, to_base
from loraserve.scheduler.types import BASE, AdapterRef, GenerationRequest

FAST = settings(max_examples=200, deadline=None)
modes = st.sampled_from(("", "fail", "base"))
passports = st.sampled_from((None, "fail", "base"))
produced = st.integers(0, 50)


@FAST
@given(modes, passports, produced)
def test_falls_back_only_when_the_request_and_the_passport_allow_it_before_any_token(mode, adapter, made):
    assert falls_back(mode, adapter, made) == (mode in ("", "base") and adapter == "base" and made == 0)


@FAST
@given(modes, passports)
def test_a_caller_never_gets_more_than_the_adapter_allows(mode, adapter):
    assert not falls_back(mode, adapter) or falls_back("", adapter)
    assert not falls_back("fail", adapter)


@FAST
@given(modes, passports, produced)
def test_past_the_edge_the_carried_verdict_decides_with_the_tokens(mode, adapter, made):
    req = GenerationRequest("r", AdapterRef("a", "1", "/store/a"), (1, 2), 4,
                            fallback_to_base=falls_back(mode, adapter))
    assert carried(req, made) == falls_back(mode, adapter, made)


@FAST
@given(st.booleans(), produced)
def test_a_request_falls_back_once_and_says_why_and_from_what(allowed, made):
    req = GenerationRequest("r", AdapterRef("a", "1", "/store/a"), (1, 2), 4, fallback_to_base=allowed)
    moved = to_base(req, AdapterIncompatible("a@1", "trained for another base"))
    assert moved.adapter == BASE and moved.requested == "a@1" and moved.fallback_reason
    assert not carried(moved, made)
