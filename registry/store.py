"""The adapter store on disk, and its lifecycle operations.

    ROOT/
      registry.json            index of every passport, rebuilt from the store
                               after each change (delete it freely; `reindex`)
      NAME/
        VERSION/               1, 2, 3 ... one self-contained directory per version
          adapter_config.json
          adapter_model.safetensors
          metadata.json        the passport (registry.passport)

At most one version of a name is `active`; the name and its aliases resolve to
it. Changes are written passport by passport (atomic renames) and then the
index, whose change is what running servers watch for (hot reload).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from registry.identity import BaseIdentity, sha256_file
from registry.passport import NAME, Passport, SmokeTest

INDEX = "registry.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


class StoreError(Exception):
    """A lifecycle operation refused, with the reason people need to fix it."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Snapshot:
    """Every passport in the store at one moment, with lookups."""

    passports: tuple[Passport, ...]

    def versions(self, name: str) -> list[Passport]:
        return sorted((p for p in self.passports if p.name == name), key=lambda p: int(p.version))

    def active(self, name: str) -> Passport | None:
        return next((p for p in self.passports if p.name == name and p.status == "active"), None)

    def get(self, name: str, version: str) -> Passport | None:
        return next((p for p in self.passports if p.name == name and p.version == version), None)

    def names(self) -> list[str]:
        return sorted({p.name for p in self.passports})

    def aliases(self) -> dict[str, str]:
        """alias -> name, from active versions (an alias follows promotion)."""
        return {a: p.name for p in self.passports if p.status == "active" for a in p.aliases}


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def scan(self) -> Snapshot:
        passports = []
        for meta in sorted(self.root.glob("*/*/metadata.json")):
            passports.append(Passport.read(meta.parent))
        return Snapshot(tuple(passports))

    def reindex(self) -> Snapshot:
        snap = self.scan()
        tmp = self.root / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"generated": now_iso(), "adapters": [p.to_dict() for p in snap.passports]},
                                  indent=1) + "\n")
        tmp.replace(self.root / INDEX)
        return snap

    def load_index(self) -> Snapshot:
        """The index if present (cheap), else a scan."""
        try:
            data = json.loads((self.root / INDEX).read_text())
        except FileNotFoundError:
            return self.scan()
        return Snapshot(tuple(Passport.from_dict(d) for d in data["adapters"]))

    def index_stamp(self) -> int:
        try:
            return (self.root / INDEX).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    # -- lifecycle -------------------------------------------------------------
    def register(self, source: Path, name: str, base: BaseIdentity,
                 smoke_test: Callable[[Path], SmokeTest], **fields) -> Passport:
        """Copy a PEFT adapter directory in as the next version of `name`, hash it,
        smoke-test it and write its passport: `staging` if the test passed, else `failed`."""
        source = Path(source)
        if not NAME.match(name):
            raise StoreError(f"name {name!r} must be letters, digits, '-' or '_'")
        if not (source / CONFIG).is_file():
            raise StoreError(f"{source} has no {CONFIG}: not a PEFT adapter directory")
        if not (source / WEIGHTS).is_file():
            if (source / PICKLE_WEIGHTS).is_file():
                raise StoreError(f"{source} has only pickle weights ({PICKLE_WEIGHTS}), which can run code when "
                                 "loaded; convert them to safetensors first")
            raise StoreError(f"{source} has no {WEIGHTS}")
        adapter_config = json.loads((source / CONFIG).read_text())
        existing = [int(p.version) for p in self.scan().versions(name)]
        version = str(max(existing, default=0) + 1)
        target = self.version_dir(name, version)
        target.mkdir(parents=True)
        try:
            for f in (CONFIG, WEIGHTS):
                shutil.copy2(source / f, target / f)
            targets = adapter_config.get("target_modules") or []
            passport = Passport(
                name=name, version=version, base_model=base.model_id, base_model_revision=base.revision,
                weights_sha256=sha256_file(target / WEIGHTS), created=now_iso(),
                rank=int(adapter_config.get("r", 0)),
                target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)], **fields)
            passport.smoke_test = smoke_test(target)
            passport.status = "staging" if passport.smoke_test.passed else "failed"
            passport.write(target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        self.reindex()
        return passport

    def promote(self, name: str, version: str) -> Passport:
        snap = self.scan()
        target = snap.get(name, version)
        if target is None:
            raise StoreError(f"{name}@{version} is not in the store")
        if target.status == "active":
            return target
        if target.status == "failed" or not (target.smoke_test and target.smoke_test.passed):
            raise StoreError(f"{name}@{version} has not passed its smoke test and cannot be promoted")
        self._check_aliases(snap, target)
        current = snap.active(name)
        if current is not None:
            current.status = "archived"
            current.write(self.version_dir(name, current.version))
        target.status, target.promoted_at = "active", now_iso()
        target.write(self.version_dir(name, version))
        self.reindex()
        return target

    def rollback(self, name: str) -> Passport:
        """Re-activate the version that was active before the current one; the current one
        goes back to staging."""
        snap = self.scan()
        current = snap.active(name)
        if current is None:
            raise StoreError(f"{name} has no active version to roll back from")
        previous = [p for p in snap.versions(name) if p.status == "archived" and p.promoted_at]
        if not previous:
            raise StoreError(f"{name} has no earlier promoted version to roll back to")
        before = max(previous, key=lambda p: p.promoted_at)
        current.status, current.promoted_at = "staging", ""
        current.write(self.version_dir(name, current.version))
        before.status = "active"
        before.write(self.version_dir(name, before.version))
        self.reindex()
        return before

    def archive(self, name: str) -> list[Passport]:
        """Take every version of `name` out of service (the files stay)."""
        versions = self.scan().versions(name)
        if not versions:
            raise StoreError(f"{name} is not in the store")
        for p in versions:
            if p.status != "archived":
                p.status = "archived"
                p.write(self.version_dir(name, p.version))
        self.reindex()
        return versions

    def stale(self, days: int, today: dt.datetime | None = None) -> list[Passport]:
        """Versions not active whose creation is more than `days` old: candidates to delete."""
        today = today or dt.datetime.now(dt.timezone.utc)
        cutoff = today - dt.timedelta(days=days)
        return [p for p in self.scan().passports
                if p.status != "active" and dt.datetime.fromisoformat(p.created) < cutoff]

    @staticmethod
    def _check_aliases(snap: Snapshot, target: Passport) -> None:
        taken = {**{n: n for n in snap.names()}, **snap.aliases()}
        for alias in target.aliases:
            owner = taken.get(alias)
            if owner is not None and owner != target.name:
                raise StoreError(f"alias {alias!r} already names {owner!r}")
