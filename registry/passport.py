"""The passport: metadata.json beside each adapter version, the facts about it.

Its `status` and `promoted_at` mirror registry.json, which alone decides them (registry.store).
Statuses are a str-valued enum, so a passport's JSON holds the plain words.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from loraserve.contract import NAME, name_problem, versioned
from loraserve.registry.fields import from_known
from loraserve.registry.durable import write_atomic
from loraserve.registry.evaluate import Gate
from loraserve.registry.rollout import Canary, Shadow

FALLBACKS = ("fail", "base")
PASSPORT_FILE = "metadata.json"
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY = re.compile(rf"{NAME.pattern}@[0-9]{{1,9}}")


class Status(StrEnum):
    STAGING = "staging"
    """Registered and checked, not served (unless as a canary or a shadow)."""
    ACTIVE = "active"
    """Served: at most one version of an adapter."""
    ARCHIVED = "archived"
    """Out of service; the files stay (rollback re-activates the last promoted one)."""
    FAILED = "failed"
    """Refused at registration (`failure` says why); never served."""


@dataclass
class SmokeTest:
    passed: bool
    ran_at: str
    results: list[dict] = field(default_factory=list)
    """[{"prompt": ..., "output": ...}]"""
    error: str = ""


def _texts(items) -> bool:
    """A list (or a dict's keys) of text only."""
    return isinstance(items, (list, dict)) and all(isinstance(x, str) for x in items)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _iso(value: str) -> dt.datetime:
    """A timestamp as UTC; a bare date or a time without zone is read as UTC."""
    when = dt.datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


@dataclass
class Evaluation:
    """How a version was trained and evaluated (given at registration; the store checks only form)."""

    metrics: dict[str, float] = field(default_factory=dict)
    """e.g. {"rougeL": 0.41, "exact_match": 0.73}, on the eval set below."""
    eval_set_size: int = 0
    evaluated_at: str = ""
    dataset_sha256: str = ""
    """sha256 of the training data set, so two versions can be told apart by what they learned."""
    training_config: dict = field(default_factory=dict)
    trained_at: str = ""
    """When training finished; `stale` ages a version by this (else by `created`)."""
    previous_version: str = ""
    """Lineage: NAME@VERSION this one was trained from or replaces (default: the active version)."""

    def __post_init__(self):
        problems = []
        if not isinstance(self.metrics, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in self.metrics.items()):
            problems.append("metrics must map names to numbers")
        if not isinstance(self.eval_set_size, int) or isinstance(self.eval_set_size, bool) or self.eval_set_size < 0:
            problems.append("eval_set_size must be a whole number >= 0")
        for name in ("evaluated_at", "trained_at"):
            try:
                getattr(self, name) and _iso(getattr(self, name))
            except (TypeError, ValueError):
                problems.append(f"{name} must be an ISO date or timestamp")
        if self.dataset_sha256 and not SHA256.fullmatch(str(self.dataset_sha256)):
            problems.append("dataset_sha256 must be 64 lowercase hex digits")
        if not isinstance(self.training_config, dict):
            problems.append("training_config must be a JSON object")
        if self.previous_version and not KEY.fullmatch(str(self.previous_version)):
            problems.append("previous_version must look like NAME@VERSION")
        if problems:
            raise ValueError("evaluation: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict) -> Evaluation:
        return from_known(cls, data, "evaluation")


@dataclass
class Passport:
    name: str
    version: str
    base_model: str
    """Id of the base model it was trained for (config `_name_or_path` or directory name)."""
    base_model_revision: str
    """sha256 fingerprint of that base model's files (registry.identity); must equal the served one."""
    weights_sha256: str
    created: str
    status: Status = Status.STAGING
    task: str = ""
    client: str = ""
    """Owning team or customer."""
    language: str = ""
    description: str = ""
    constraints: str = ""
    rank: int = 0
    """Largest LoRA rank in the weights (read from the tensors at registration)."""
    ranks: dict[str, int] = field(default_factory=dict)
    """Target module leaf name -> its largest rank, from the tensors."""
    target_modules: list[str] = field(default_factory=list)
    """Leaf names of the modules the tensors adapt."""
    dtype: str = ""
    """safetensors dtype of the tensors."""
    allowed_clients: list[str] = field(default_factory=list)
    """The adapter's (registry.policy): clients (bearer-token identities) allowed to use it; empty
    means every client."""
    fallback: str = "fail"
    """The adapter's: when it cannot be served, "fail" the request, or allow "base" (the bare model,
    flagged in the response)."""
    aliases: list[str] = field(default_factory=list)
    """The adapter's: other names that resolve to its active version."""
    policy_history: list[dict] = field(default_factory=list)
    """The adapter's policy changes, oldest first: {at, change, allowed_clients, aliases, fallback,
    version (a registration's), reason (if given)}."""
    promoted_at: str = ""
    smoke_test: SmokeTest | None = None
    failure: str = ""
    """Why registration marked it `failed` (weights disagreeing with the config, or the smoke test)."""
    evaluation: Evaluation = field(default_factory=Evaluation)
    canary: Canary | None = None
    """The last canary of this version against its adapter's active one (registry.rollout)."""
    shadow: Shadow | None = None
    """Set while this version shadows its adapter's active one (registry.rollout)."""
    gate: Gate | None = None
    """Its last evaluation gate (registry.evaluate): the adapter's test set run side by side for
    this version, the active one and the base model; promote refuses a failed or missing one."""
    history: list[dict] = field(default_factory=list)
    """This version's overrides, oldest first: {at, change (e.g. "promote --force"), reason}."""

    def __post_init__(self):
        if isinstance(self.smoke_test, dict):
            self.smoke_test = SmokeTest(**self.smoke_test)
        if isinstance(self.canary, dict):
            self.canary = Canary.from_dict(self.canary)
        if isinstance(self.shadow, dict):
            self.shadow = Shadow.from_dict(self.shadow)
        if isinstance(self.evaluation, dict):
            self.evaluation = Evaluation.from_dict(self.evaluation)
        if isinstance(self.gate, dict):
            self.gate = Gate.from_dict(self.gate)
        problems = [f"{f.name} must be text" for f in dataclasses.fields(self)
                    if f.type in ("str", "Status") and not isinstance(getattr(self, f.name), str)]
        if problems:  # the checks below assume text where text belongs
            raise ValueError("; ".join(problems))
        ids = [("name", self.name), *(("alias", a) for a in (self.aliases if _texts(self.aliases) else ()))]
        problems += [f"{kind} {why}" for kind, ident in ids if (why := name_problem(ident)) is not None]
        if not self.version.isdigit():
            problems.append(f"version {self.version!r} must be a number")
        if self.status in tuple(Status):
            self.status = Status(self.status)
        else:
            problems.append(f"status must be one of {tuple(s.value for s in Status)}")
        if self.fallback not in FALLBACKS:
            problems.append(f"fallback must be one of {FALLBACKS}")
        if self.weights_sha256 and not SHA256.fullmatch(self.weights_sha256):
            problems.append("weights_sha256 must be 64 lowercase hex digits")
        if not _count(self.rank):
            problems.append("rank must be a whole number >= 0")
        if not (isinstance(self.ranks, dict) and _texts(self.ranks) and all(map(_count, self.ranks.values()))):
            problems.append("ranks must map module names to whole numbers")
        for name in ("target_modules", "allowed_clients", "aliases"):
            if not _texts(getattr(self, name)):
                problems.append(f"{name} must be a list of text")
        if not (isinstance(self.policy_history, list) and all(isinstance(e, dict) for e in self.policy_history)):
            problems.append("policy_history must be a list of objects")
        for name in ("created", "promoted_at"):
            try:
                (getattr(self, name) or name == "created") and _iso(getattr(self, name))
            except ValueError:
                problems.append(f"{name} must be an ISO timestamp")
        if not (self.smoke_test is None or isinstance(self.smoke_test, SmokeTest)
                and isinstance(self.smoke_test.passed, bool) and isinstance(self.smoke_test.results, list)):
            problems.append("smoke_test must be an object with passed (true/false) and results (a list)")
        if not (self.canary is None or isinstance(self.canary, Canary)):
            problems.append("canary must be an object")
        if not (self.shadow is None or isinstance(self.shadow, Shadow)):
            problems.append("shadow must be an object")
        if not (self.gate is None or isinstance(self.gate, Gate)):
            problems.append("gate must be an object")
        if not (isinstance(self.history, list) and all(isinstance(e, dict) for e in self.history)):
            problems.append("history must be a list of objects")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def key(self) -> str:
        return versioned(self.name, self.version)

    @property
    def trained(self) -> dt.datetime:
        """When it was trained, else when it was registered."""
        return _iso(self.evaluation.trained_at or self.created)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Passport:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, version_dir: Path) -> Passport:
        return cls.from_dict(json.loads((version_dir / PASSPORT_FILE).read_text()))

    def write(self, version_dir: Path) -> None:
        """Atomically and durably: a crash leaves the old passport or the new one, never half."""
        write_atomic(version_dir / PASSPORT_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

