"""The evaluation gate (registry/evaluate.py, tools/evaluate.py, `adapters evaluate`, `register
--test-set`, `promote --force`): the test set's parsing and checks as pure functions, then the
cases run through a real server (in process, and a running one with --target) on the demo, with
a candidate version that regresses a case, on local and moto-backed S3 stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import PROMPT, ServerThread, clone_adapter, server_config
from loraserve.registry.evaluate import (Answer, BadTestSet, Gate, cases_sha256, check, judge, parse_case, parse_test_set,
                               pending)
from loraserve.registry.identity import BaseIdentity, base_identity
from loraserve.registry.origin import open_store
from loraserve.registry.passport import SmokeTest
from loraserve.registry.rollout import Canary
from loraserve.registry.errors import StoreError
from loraserve.registry.store import Store
from tiny import tiny_adapter

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


# -- the gate in the store's lifecycle (no model): local and S3 -----------------------------------
def passed(_dir):
    return SmokeTest(True, "now", [{"prompt": "p", "output": "o"}])


def evaluated(passed_: bool, regressions=()) -> Gate:
    cases = parse_test_set(jsonl(CASES))
    return Gate(pending(cases).test_set, cases_sha256(cases), passed_, 1.0 if passed_ else 0.5, 0.8,
                "2026-01-01T00:00:00+00:00", "in-process", regressions=list(regressions))


def test_promote_follows_the_gate_and_force_is_recorded(any_store, tmp_path):
    store, raw = any_store, tiny_adapter(tmp_path / "raw")
    base = BaseIdentity("tiny-base", "rev-1")
    first = store.register(raw, "legal", base, passed, gate=pending(parse_test_set(jsonl(CASES))))
    assert first.gate.state == "pending"
    with pytest.raises(StoreError, match="has not run"):
        store.promote("legal", "1")
    store.record_gate("legal", "1", evaluated(True))
    assert store.promote("legal", "1").status == "active"
    # The adapter has a test set now: a version without a gate is refused, as a canary too.
    store.register(raw, "legal", base, passed)
    with pytest.raises(StoreError, match="never evaluated"):
        store.promote("legal", "2")
    with pytest.raises(StoreError, match="never evaluated"):
        store.canary("legal", "2", Canary(10, "2026-01-01T00:00:00+00:00"))
    store.record_gate("legal", "2", evaluated(False, ["legal-voice"]))
    with pytest.raises(StoreError, match="fails legal-voice, which the active version passes"):
        store.promote("legal", "2")
    forced = store.promote("legal", "2", force=True)
    assert forced.status == "active" and [h["change"] for h in forced.history] == ["promote --force"]
    assert "legal-voice" in forced.history[0]["reason"]
    # The index decides gate and history, as it does status, and recovery keeps them.
    again = store.reindex().get("legal", "2")
    assert again.gate.regressions == ["legal-voice"] and again.history == forced.history
    assert store.snapshot().get("legal", "1").gate.passed


# -- the cases through a real server, in process and with --target ---------------------------------
def cli(*args) -> int:
    from loraserve.tools.cli import main

    return main(["adapters", *args])


@pytest.fixture()
def legal_store(demo_dir, tmp_path) -> Path:
    """A store with legal@1 (the demo's legal weights) active, and the test set beside it."""
    root = tmp_path / "store"
    clone_adapter(demo_dir, root, "legal", "legal")
    (tmp_path / "legal.jsonl").write_text(jsonl(CASES))
    return root


def test_register_evaluates_and_a_regression_blocks_promote_unless_forced(demo_dir, legal_store, tmp_path, capsys):
    base, sets = str(demo_dir / "base"), str(tmp_path / "legal.jsonl")
    # Medical weights registered as legal@2 answer in medical terms: the legal case regresses.
    rc = cli("--store", str(legal_store), "--json", "register", str(demo_dir / "adapters" / "medical" / "1"),
             "--name", "legal", "--model-path", base, "--test-set", sets)
    out, err = capsys.readouterr()
    assert rc == 1 and "fails legal-voice, which the active version passes" in err
    p = Store.local(legal_store).snapshot().get("legal", "2")
    assert (p.status, p.gate.state, p.gate.regressions, p.gate.target) == ("staging", "failed", ["legal-voice"],
                                                                           "in-process")
    assert set(p.gate.sides) == {"candidate", "active", "base"} and p.gate.sides["active"]["pass_rate"] == 1.0
    row = p.gate.cases[0]
    assert row["active"]["passed"] and not row["candidate"]["passed"] and not row["base"]["passed"]
    assert row["candidate"]["output_tokens"] > 0 and p.gate.sides["candidate"]["mean_latency_ms"] > 0
    assert p.gate.test_set_sha256 == cases_sha256(parse_test_set(jsonl(CASES)))

    assert cli("--store", str(legal_store), "promote", "legal", "2") == 1
    assert "--force overrides" in capsys.readouterr().err
    assert cli("--store", str(legal_store), "promote", "legal", "2", "--force") == 0
    capsys.readouterr()
    forced = Store.local(legal_store).snapshot().get("legal", "2")
    assert forced.status == "active" and forced.history[0]["change"] == "promote --force"

    # legal@3 (legal weights again), evaluated by a running server on the adapter's recorded test set.
    clone_adapter(demo_dir, legal_store, "legal", "legal", "3", status="staging")
    srv = ServerThread(server_config(demo_dir, adapters_dir=legal_store))
    try:
        assert cli("--store", str(legal_store), "evaluate", "legal", "3", "--target", srv.target) == 0
    finally:
        srv.stop()
    table = capsys.readouterr().out
    assert "gate PASSED" in table and "legal@2" in table and "legal-voice" in table
    third = Store.local(legal_store).snapshot().get("legal", "3")
    assert third.gate.passed and third.gate.target == srv.target and third.gate.regressions == []
    assert cli("--store", str(legal_store), "promote", "legal", "3") == 0


def test_evaluate_in_process_on_an_s3_store(demo_dir, moto_endpoint, bucket, tmp_path, capsys):
    store = open_store(bucket, endpoint_url=moto_endpoint, cache_dir=tmp_path / "cache")
    base = base_identity(demo_dir / "base")
    for source in ("legal", "medical"):
        store.register(demo_dir / "adapters" / source / "1", "legal", base, passed)
    store.promote("legal", "1")
    (tmp_path / "legal.jsonl").write_text(jsonl(CASES))
    rc = cli("--store", bucket, "--s3-endpoint-url", moto_endpoint, "--json", "evaluate", "legal", "2",
             "--test-set", str(tmp_path / "legal.jsonl"), "--model-path", str(demo_dir / "base"))
    shown = json.loads(capsys.readouterr().out)
    assert rc == 1 and shown["regressions"] == ["legal-voice"]
    assert store.snapshot().get("legal", "2").gate.regressions == ["legal-voice"]
    with pytest.raises(StoreError, match="legal-voice"):
        store.promote("legal", "2")


def test_an_interrupted_registration_leaves_the_gate_pending(tmp_path):
    """The test set is recorded with the version in the index write that adds it: if the evaluation
    never finishes (the process dies in it), the version cannot be promoted."""
    import argparse

    from loraserve.registry.cli import add_adapters_parser
    from tiny import fake_base

    def dies(**_):
        raise SystemExit(137)

    parser = argparse.ArgumentParser()
    add_adapters_parser(parser.add_subparsers(dest="command"), smoke=lambda *_: passed, run_cases=dies)
    (tmp_path / "set.jsonl").write_text(jsonl(CASES))
    root = tmp_path / "store"

    def run(*argv):
        args = parser.parse_args(["adapters", "--store", str(root), *argv])
        return args.func(args)

    with pytest.raises(SystemExit):
        run("register", str(tiny_adapter(tmp_path / "raw")), "--name", "legal", "--model-path",
            str(fake_base(tmp_path / "base")), "--test-set", str(tmp_path / "set.jsonl"))
    p = Store.open(root).snapshot().get("legal", "1")
    assert p.status == "staging" and p.gate.state == "pending" and len(p.gate.test_set) == 2
    with pytest.raises(StoreError, match="has not run"):
        Store.local(root).promote("legal", "1")
    with pytest.raises(SystemExit):  # `evaluate` without --test-set runs the recorded one
        run("evaluate", "legal", "1")
    assert run("evaluate", "legal", "9") == 1  # not in the store: said, exit 1
