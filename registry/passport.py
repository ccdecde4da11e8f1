"""The passport: metadata.json beside each adapter version, the single source of truth about it."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("staging", "active", "archived", "failed")
FALLBACKS = ("fail", "base")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PASSPORT_FILE = "metadata.json"


@dataclass
class SmokeTest:
    passed: bool
    ran_at: str
    results: list[dict] = field(default_factory=list)
    """[{"prompt": ..., "output": ...}]"""
    error: str = ""


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
    status: str = "staging"
    task: str = ""
    client: str = ""
    """Owning team or customer."""
    language: str = ""
    description: str = ""
    constraints: str = ""
    rank: int = 0
    target_modules: list[str] = field(default_factory=list)
    allowed_clients: list[str] = field(default_factory=list)
    """Clients (bearer-token identities) allowed to use it; empty means every client."""
    fallback: str = "fail"
    """When it cannot be served: "fail" the request, or allow "base" (the bare model, flagged in the response)."""
    aliases: list[str] = field(default_factory=list)
    """Other names that resolve to this adapter's active version."""
    promoted_at: str = ""
    smoke_test: SmokeTest | None = None

    def __post_init__(self):
        if isinstance(self.smoke_test, dict):
            self.smoke_test = SmokeTest(**self.smoke_test)
        problems = []
        if not NAME.match(self.name):
            problems.append(f"name {self.name!r} must be letters, digits, '-' or '_'")
        if not self.version.isdigit():
            problems.append(f"version {self.version!r} must be a number")
        if self.status not in STATUSES:
            problems.append(f"status must be one of {STATUSES}")
        if self.fallback not in FALLBACKS:
            problems.append(f"fallback must be one of {FALLBACKS}")
        bad = [a for a in self.aliases if not NAME.match(a)]
        if bad:
            problems.append(f"alias {bad[0]!r} is not a valid name")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

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
        tmp = version_dir / (PASSPORT_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(version_dir / PASSPORT_FILE)
