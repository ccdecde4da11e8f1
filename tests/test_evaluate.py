"""The evaluation gate (registry/evaluate.py, tools/evaluate.py, `adapters evaluate`, `register
--test-set`, `promote --force`): the test set's parsing and checks as pure functions, then the
cases run through a real server (in process, and a running one with --target) on the demo, with
a candidate version that regresses a case, on local and moto-backed S3 stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import PROMPT, clone_adapter, demo_dir  # noqa: F401  (demo_dir: the fixture)
from registry.evaluate import (Answer, BadTestSet, Gate, cases_sha256, check, judge, parse_case, parse_test_set,
                               pending)
from registry.identity import base_identity
from registry.origin import open_store
from registry.passport import SmokeTest
from registry.store import Store, StoreError

LEGAL = "lessee|contracting party|court|licensor|defendant"
CASES = [  # legal@1 passes both; medical weights registered as legal@2 fail the first
    {"id": "legal-voice", "prompt": PROMPT, "max_new_tokens": 10, "expect": {"regex": LEGAL}},
    {"id": "no-weather", "prompt": "Question: What are my options?\nAnswer:", "max_new_tokens": 10,
     "expect": {"not_contains": ["weather", "garden"]}},
]


def jsonl(cases) -> str:
    return "".join(json.dumps(c) + "\n" for c in cases)


# -- parsing and checks (pure) ---------------------------------------------------------------------
def test_a_test_set_parses_with_defaults_and_canonical_hash():
    text = jsonl([{"prompt": "Q:", "expect": {"contains": "x"}},
                  {"id": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "seed": 3,
                   "top_p": 0.9, "top_k": 5, "stop_sequences": ["\n"], "max_new_tokens": 4,
                   "expect": {"equals": "hello"}}])
    cases = parse_test_set("\n" + text + "\n")
    assert [c.id for c in cases] == ["line 2", "chat"]
    assert cases[0].max_new_tokens == 32 and cases[1].max_new_tokens == 4
    assert cases[1].messages == (("user", "hi"),) and cases[1].sampling["seed"] == 3
    # Recorded cases re-parse to the same cases and hash the same, whatever the file's spacing.
    again = [parse_case(c.to_dict(), "x") for c in cases]
    assert again == cases and cases_sha256(again) == cases_sha256(parse_test_set("\n" + text.replace(": ", ":")))


@pytest.mark.parametrize("line, why", [
    ('{"expect": {"contains": "x"}}', "exactly one of prompt or messages"),
    ('{"prompt": "a", "messages": [], "expect": {"contains": "x"}}', "exactly one of prompt or messages"),
    ('{"prompt": "a"}', "expect is missing"),
    ('{"prompt": "a", "expect": {}}', "expect must be an object"),
    ('{"prompt": "a", "expect": {"startswith": "x"}}', "unknown check"),
    ('{"prompt": "a", "expect": {"regex": "("}}', "regex"),
    ('{"prompt": "a", "expect": {"contains": []}}', "contains must be text"),
    ('{"prompt": "a", "expect": {"json_schema": {"type": 5}}}', "not a valid schema"),
    ('{"prompt": "a", "max_new_tokens": 0, "expect": {"contains": "x"}}', "max_new_tokens"),
    ('{"prompt": "a", "top_p": 2, "expect": {"contains": "x"}}', "top_p"),
    ('{"prompt": "a", "beam": 2, "expect": {"contains": "x"}}', "unknown field"),
    ('{"messages": [{"role": "user"}], "expect": {"contains": "x"}}', "messages must be"),
    ('not json', "line 1"),
])
def test_a_bad_case_is_refused_naming_its_line(line, why):
    with pytest.raises(BadTestSet, match=why):
        parse_test_set(line)


def test_ids_are_unique_and_a_set_is_not_empty():
    with pytest.raises(BadTestSet, match="used twice"):
        parse_test_set(jsonl([{"id": "a", "prompt": "p", "expect": {"contains": "x"}}] * 2))
    with pytest.raises(BadTestSet, match="no cases"):
        parse_test_set("\n\n")


def test_each_expect_kind():
    assert check({"contains": "court"}, "The court rules") == []
    assert check({"contains": ["court", "lessee"]}, "The court rules") == ["lacks 'lessee'"]
    assert check({"not_contains": "weather"}, "The weather") == ["has 'weather'"]
    assert check({"regex": r"\bshall\b"}, "it shall") == [] and check({"regex": "^x"}, "y") == ["does not match /^x/"]
    assert check({"equals": "yes"}, "  yes\n") == [] and check({"equals": "yes"}, "yes!") == ["is not 'yes'"]
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    assert check({"json_schema": schema}, '{"a": 1}') == []
    assert check({"json_schema": schema}, "a: 1") == ["is not JSON"]
    assert check({"json_schema": schema}, '{"a": "1"}')[0].startswith("breaks the schema")
    assert len(check({"contains": "x", "equals": "y", "regex": "z"}, "w")) == 3  # every check must pass


def test_judge_finds_regressions_and_the_pass_rate():
    cases = parse_test_set(jsonl(CASES))
    sides = {"candidate": "legal@2", "active": "legal@1", "base": "base"}
    answers = {"candidate": [Answer("The patient", 2, 10.0), Answer("fine", 1, 20.0)],
               "active": [Answer("The court", 2, 30.0), Answer("", 0, 5.0, error="UNAVAILABLE: down")],
               "base": [Answer("The weather", 2, 1.0), Answer("The garden", 2, 1.0)]}
    gate = judge(cases, sides, answers, 0.5, "2026-01-01T00:00:00+00:00", "in-process")
    assert (gate.passed, gate.pass_rate, gate.regressions, gate.state) == (False, 0.5, ["legal-voice"], "failed")
    assert gate.sides["active"] == {"adapter": "legal@1", "pass_rate": 0.5, "mean_output_tokens": 1.0,
                                    "mean_latency_ms": 17.5, "errors": 1}
    assert gate.cases[1]["active"]["failures"] == ["UNAVAILABLE: down"]
    assert "legal-voice" in gate.problem() and Gate.from_dict(json.loads(json.dumps(gate.__dict__))) == gate
    # Without an active version only the rate decides.
    del sides["active"], answers["active"]
    assert judge(cases, sides, answers, 0.5, "2026-01-01", "x").passed
    assert not judge(cases, sides, answers, 0.8, "2026-01-01", "x").passed
    assert pending(cases).state == "pending" and "has not run" in pending(cases).problem()
