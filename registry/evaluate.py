"""The evaluation gate: a small test set run through the served model, side by side for a candidate
version, its adapter's active version and the base model, judged case by case.

Pure (no torch, no server): parsing the test set, checking an answer against a case's `expect`,
judging the sides into a `Gate` (the passport's record), and the table people read. Running the
cases is the torch side's (tools/evaluate.py: an in-process server, or a running one).

A test set is JSONL, one case per line:

    {"id": "next", "prompt": "Question: What now?\\nAnswer:", "max_new_tokens": 16,
     "expect": {"contains": "court", "not_contains": ["weather"], "regex": "\\\\bshall\\\\b"}}

`prompt` or `messages` ([{"role", "content"}]), optional sampling (max_new_tokens, temperature,
top_p, top_k, seed, stop_sequences), optional `id` (default: its line number) and `expect`, with
any of: contains / not_contains (text or list of texts, case-sensitive), regex (re.search; text
or list), equals (the whole answer, surrounding whitespace ignored), json_schema (the answer
parses as JSON and validates). A case passes when every check does.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum

import jsonschema

from loraserve.registry.fields import from_known

SIDES = ("candidate", "active", "base")
SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_sequences")
EXPECTS = ("contains", "not_contains", "regex", "equals", "json_schema")
DEFAULT_MAX_NEW_TOKENS = 32
MIN_PASS_RATE = 0.8
"""The default floor: a test set of 20-30 prompts usually holds a few hard cases; any case the
active version passes must still pass (a regression fails the gate whatever the rate)."""
SHOWN_CHARS = 200
"""Answers are recorded (passport, table) up to this many characters."""


class BadTestSet(ValueError):
    """A test set that cannot be run, with the line and the reason."""


@dataclass(frozen=True)
class Case:
    id: str
    expect: dict
    prompt: str = ""
    messages: tuple = ()
    """((role, content), ...)"""
    sampling: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """As the test set's line would say it (canonical: what is hashed and recorded)."""
        out = {"id": self.id, **({"prompt": self.prompt} if not self.messages else
                                 {"messages": [{"role": r, "content": c} for r, c in self.messages]})}
        return {**out, **self.sampling, "expect": self.expect}

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)


def _texts(value, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not (isinstance(items, list) and items and all(isinstance(x, str) for x in items)):
        raise ValueError(f"{what} must be text or a non-empty list of texts")
    return items


def _check_expect(expect) -> None:
    if not isinstance(expect, dict) or not expect:
        raise ValueError(f"expect must be an object with any of {', '.join(EXPECTS)}")
    unknown = set(expect) - set(EXPECTS)
    if unknown:
        raise ValueError(f"expect: unknown check(s) {sorted(unknown)}; known: {', '.join(EXPECTS)}")
    for kind in ("contains", "not_contains"):
        if kind in expect:
            _texts(expect[kind], kind)
    for pattern in _texts(expect["regex"], "regex") if "regex" in expect else ():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"regex {pattern!r}: {exc}") from exc
    if "equals" in expect and not isinstance(expect["equals"], str):
        raise ValueError("equals must be text")
    if "json_schema" in expect:
        schema = expect["json_schema"]
        if not isinstance(schema, (dict, bool)):
            raise ValueError("json_schema must be a JSON Schema (an object)")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"json_schema is not a valid schema: {exc.message}") from exc


def _check_sampling(sampling: dict) -> None:
    def number(k, low, high=float("inf")):
        v = sampling.get(k)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high):
            raise ValueError(f"{k} must be a number in [{low}, {high}]")

    for k in ("max_new_tokens", "top_k", "seed"):
        if k in sampling and not (isinstance(sampling[k], int) and not isinstance(sampling[k], bool)
                                  and sampling[k] >= (1 if k == "max_new_tokens" else 0)):
            raise ValueError(f"{k} must be a whole number >= {1 if k == 'max_new_tokens' else 0}")
    number("temperature", 0)
    number("top_p", 0, 1)
    if "stop_sequences" in sampling:
        _texts(sampling["stop_sequences"], "stop_sequences")


def parse_case(data, default_id: str) -> Case:
    if not isinstance(data, dict):
        raise ValueError("a case must be a JSON object")
    unknown = set(data) - {"id", "prompt", "messages", "expect", *SAMPLING}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    if ("prompt" in data) == ("messages" in data):
        raise ValueError("give exactly one of prompt or messages")
    if "prompt" in data and not (isinstance(data["prompt"], str) and data["prompt"]):
        raise ValueError("prompt must be non-empty text")
    messages = data.get("messages", [])
    if "messages" in data and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
            for m in messages)):
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    if "expect" not in data:
        raise ValueError("expect is missing: a case must check something")
    _check_expect(data["expect"])
    sampling = {k: data[k] for k in SAMPLING if k in data}
    _check_sampling(sampling)
    case_id = data.get("id", default_id)
    if not isinstance(case_id, str) or not case_id:
        raise ValueError("id must be non-empty text")
    return Case(case_id, data["expect"], data.get("prompt", ""),
                tuple((m["role"], m["content"]) for m in messages), sampling)


def parse_test_set(text: str, where: str = "test set") -> list[Case]:
    """Every case of a JSONL test set (blank lines skipped); BadTestSet naming the line."""
    cases, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = parse_case(json.loads(line), f"line {number}")
        except ValueError as exc:
            raise BadTestSet(f"{where} line {number}: {exc}") from exc
        if case.id in seen:
            raise BadTestSet(f"{where} line {number}: id {case.id!r} is used twice")
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise BadTestSet(f"{where} has no cases")
    return cases


def cases_sha256(cases: list[Case]) -> str:
    """Of the cases in canonical JSON (sorted keys, one a line): the same cases hash the same
    whatever the file's spacing, so a test set recorded in a passport keeps its hash."""
    lines = "".join(json.dumps(c.to_dict(), sort_keys=True, separators=(",", ":")) + "\n" for c in cases)
    return hashlib.sha256(lines.encode()).hexdigest()


def check(expect: dict, text: str) -> list[str]:
    """What `text` fails of `expect` (empty: it passes)."""
    out = []
    out += [f"lacks {s!r}" for s in _texts(expect["contains"], "") if s not in text] if "contains" in expect else []
    out += [f"has {s!r}" for s in _texts(expect["not_contains"], "") if s in text] if "not_contains" in expect else []
    if "regex" in expect:
        out += [f"does not match /{p}/" for p in _texts(expect["regex"], "") if re.search(p, text) is None]
    if "equals" in expect and text.strip() != expect["equals"].strip():
        out.append(f"is not {expect['equals']!r}")
    if "json_schema" in expect:
        try:
            jsonschema.validate(json.loads(text), expect["json_schema"])
        except ValueError:
            out.append("is not JSON")
        except jsonschema.ValidationError as exc:
            out.append(f"breaks the schema: {exc.message}")
    return out


@dataclass(frozen=True)
class Answer:
    """What one side answered one case (`error`: the request failed, and why)."""

    text: str = ""
    output_tokens: int = 0
    latency_ms: float = 0.0
    error: str = ""


class GateState(StrEnum):
    PENDING = "pending"
    """Registered; its evaluation has not run."""
    PASSED = "passed"
    FAILED = "failed"


@dataclass
class Gate:
    """A version's evaluation gate, in its passport (an index write, like its status). Written
    `pending` (evaluated_at empty) by a registration given a test set, so a crash before the
    evaluation leaves a version that cannot be promoted; then by every `evaluate`."""

    test_set: list[dict]
    """The cases as run (Case.to_dict): the adapter's test set, which later versions are run on."""
    test_set_sha256: str
    passed: bool = False
    pass_rate: float = 0.0
    min_pass_rate: float = MIN_PASS_RATE
    evaluated_at: str = ""
    target: str = ""
    """Where the cases ran: "in-process", or the server's HOST:PORT."""
    sides: dict = field(default_factory=dict)
    """candidate / active / base -> {adapter, pass_rate, mean_output_tokens, mean_latency_ms, errors}."""
    regressions: list[str] = field(default_factory=list)
    """Ids of the cases the active version passes and the candidate fails."""
    cases: list[dict] = field(default_factory=list)
    """Per case: {id, <side>: {text, passed, failures, output_tokens, latency_ms, error}}."""

    def __post_init__(self):
        problems = []
        if not (isinstance(self.test_set, list) and self.test_set):
            problems.append("test_set must be a non-empty list of cases")
        else:
            try:
                for i, c in enumerate(self.test_set):
                    parse_case(c, f"case {i}")
            except ValueError as exc:
                problems.append(f"test_set: {exc}")
        if not (isinstance(self.test_set_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", self.test_set_sha256)):
            problems.append("test_set_sha256 must be 64 lowercase hex digits")
        if not isinstance(self.passed, bool):
            problems.append("passed must be true or false")
        for name in ("pass_rate", "min_pass_rate"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
                problems.append(f"{name} must be a number in [0, 1]")
        for name, kind, said in (("sides", dict, "an object"), ("regressions", list, "a list"),
                                 ("cases", list, "a list"), ("evaluated_at", str, "text"), ("target", str, "text")):
            if not isinstance(getattr(self, name), kind):
                problems.append(f"{name} must be {said}")
        if problems:
            raise ValueError("gate: " + "; ".join(problems))

    @property
    def state(self) -> GateState:
        return GateState.PENDING if not self.evaluated_at else GateState.PASSED if self.passed else GateState.FAILED

    def problem(self) -> str:
        """Why it does not let its version be promoted ('' when it does)."""
        if self.state is GateState.PENDING:
            return "its evaluation has not run (an interrupted registration?)"
        if self.passed:
            return ""
        why = [f"it fails {', '.join(self.regressions)}, which the active version passes"] if self.regressions else []
        if self.pass_rate < self.min_pass_rate:
            why.append(f"its pass rate {self.pass_rate:.2f} is below {self.min_pass_rate:.2f}")
        return f"its last evaluation ({self.evaluated_at}) failed: {'; '.join(why)}"

    def cases_to_run(self) -> list[Case]:
        return [parse_case(c, f"case {i}") for i, c in enumerate(self.test_set)]

    @classmethod
    def from_dict(cls, data) -> Gate:
        return from_known(cls, data, "gate")


def pending(cases: list[Case], min_pass_rate: float = MIN_PASS_RATE) -> Gate:
    return Gate([c.to_dict() for c in cases], cases_sha256(cases), min_pass_rate=min_pass_rate)


def judge(cases: list[Case], sides: dict[str, str], answers: dict[str, list[Answer]], min_pass_rate: float,
          evaluated_at: str, target: str) -> Gate:
    """The gate from each side's answers (`sides`: side -> the adapter id it ran as; `answers`:
    side -> one Answer per case, in order). It passes when the candidate fails no case the active
    version passes and its pass rate is at least `min_pass_rate`."""
    verdicts = {s: [not a.error and not check(c.expect, a.text) for c, a in zip(cases, answers[s])] for s in sides}
    rows = []
    for i, case in enumerate(cases):
        row = {"id": case.id}
        for s in sides:
            a = answers[s][i]
            row[s] = {"text": a.text[:SHOWN_CHARS], "passed": verdicts[s][i],
                      "failures": [a.error] if a.error else check(case.expect, a.text),
                      "output_tokens": a.output_tokens, "latency_ms": round(a.latency_ms, 2), "error": a.error}
        rows.append(row)
    figures = {s: {"adapter": sides[s], "pass_rate": sum(verdicts[s]) / len(cases),
                   "mean_output_tokens": sum(a.output_tokens for a in answers[s]) / len(cases),
                   "mean_latency_ms": round(sum(a.latency_ms for a in answers[s]) / len(cases), 2),
                   "errors": sum(bool(a.error) for a in answers[s])} for s in sides}
    regressions = [c.id for i, c in enumerate(cases)
                   if "active" in sides and verdicts["active"][i] and not verdicts["candidate"][i]]
    rate = figures["candidate"]["pass_rate"]
    return Gate([c.to_dict() for c in cases], cases_sha256(cases), not regressions and rate >= min_pass_rate,
                rate, min_pass_rate, evaluated_at, target, figures, regressions, rows)


def table(gate: Gate) -> str:
    """The sides' figures, then each case: what each side answered and whether it passed."""
    sides = [s for s in SIDES if s in gate.sides]
    lines = [f"{'SIDE':<10} {'ADAPTER':<20} {'PASS':>6} {'TOKENS':>7} {'LATENCY_MS':>11} {'ERRORS':>6}"]
    for s in sides:
        f = gate.sides[s]
        lines.append(f"{s:<10} {f['adapter']:<20} {f['pass_rate']:>6.0%} {f['mean_output_tokens']:>7.1f} "
                     f"{f['mean_latency_ms']:>11.1f} {f['errors']:>6}")
    for row in gate.cases:
        mark = "  REGRESSION" if row["id"] in gate.regressions else ""
        lines.append(f"\n{row['id']}{mark}")
        for s in sides:
            r = row[s]
            verdict = "pass" if r["passed"] else "FAIL " + "; ".join(r["failures"])
            lines.append(f"  {s:<10} {verdict}\n    {json.dumps(r['text'])}")
    lines.append(f"\ngate {'PASSED' if gate.passed else 'FAILED'}: candidate pass rate {gate.pass_rate:.2f} "
                 f"(min {gate.min_pass_rate:.2f}), {len(gate.regressions)} regression(s); "
                 f"test set sha256 {gate.test_set_sha256[:12]}")
    return "\n".join(lines)
