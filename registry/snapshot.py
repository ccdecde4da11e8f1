"""The index (registry.json) read and written: every passport in the store at one moment, with
lookups, validated whole, and the text an index write puts down.

    {"generated": ISO timestamp, "adapters": [passport, ...]}   sorted by name, then version

An index is refused whole (IndexInvalid) rather than served in part: every entry a valid passport,
no version listed twice, at most one active version, running canary and shadow per adapter, and
versions that agree on their adapter's policy (registry.policy).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

from loraserve.contract import versioned
from loraserve.registry.errors import AmbiguousId, IndexInvalid, StoreError
from loraserve.registry.passport import Passport, Status
from loraserve.registry.policy import Policy, PolicyConflict, history_of, unify

INDEX = "registry.json"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Snapshot:
    """Every passport in the store at one moment, with lookups."""

    passports: tuple[Passport, ...]

    @cached_property
    def _by_name(self) -> dict[str, list[Passport]]:
        out: dict[str, list[Passport]] = {}
        for p in sorted(self.passports, key=lambda p: (p.name, int(p.version))):
            out.setdefault(p.name, []).append(p)
        return out

    def versions(self, name: str) -> list[Passport]:
        return list(self._by_name.get(name, ()))

    def active(self, name: str) -> Passport | None:
        return next((p for p in self._by_name.get(name, ()) if p.status == Status.ACTIVE), None)

    def get(self, name: str, version: str) -> Passport | None:
        return next((p for p in self._by_name.get(name, ()) if p.version == version), None)

    def canary(self, name: str) -> Passport | None:
        """The version of `name` with a running canary (registry.rollout), if any."""
        return next((p for p in self._by_name.get(name, ()) if p.canary and p.canary.running), None)

    def shadow(self, name: str) -> Passport | None:
        """The version of `name` that shadows its active one (registry.rollout), if any."""
        return next((p for p in self._by_name.get(name, ()) if p.shadow), None)

    def names(self) -> list[str]:
        return list(self._by_name)

    def served_targets(self, revision: str) -> tuple[str, ...]:
        """The modules LoRA is applied to when --lora-target-modules is not given: the union of the
        target modules of every version a server of base `revision` could serve now (staging or
        active, trained for that base). Empty (every linear layer) when there is none."""
        return tuple(sorted({t for p in self.passports if p.status in (Status.STAGING, Status.ACTIVE)
                             and p.base_model_revision == revision for t in p.target_modules}))

    def policy(self, name: str) -> Policy:
        """The adapter's access, aliases and fallback (registry.policy), whichever version is asked for."""
        return unify(self._by_name.get(name, ()))

    def history(self, name: str) -> list[dict]:
        return history_of(self._by_name.get(name, ()))

    def problems(self) -> list[str]:
        """What makes this set of versions no index at all (each passport is valid on its own)."""
        out, seen, active = [], set(), {}
        for p in self.passports:
            if p.key in seen:
                out.append(f"{p.key} is listed twice")
            seen.add(p.key)
            if p.status == Status.ACTIVE:
                active.setdefault(p.name, []).append(p.version)
        out += [f"{name} has {len(vs)} active versions ({', '.join(vs)}); at most one may be"
                for name, vs in active.items() if len(vs) > 1]
        canaries: dict[str, list[str]] = {}
        for p in self.passports:
            if p.canary and p.canary.running:
                canaries.setdefault(p.name, []).append(p.version)
                if p.status != Status.STAGING or p.name not in active:
                    out.append(f"{p.key} has a running canary but is {p.status}"
                               + ("" if p.name in active else f" and {p.name} has no active version"))
        out += [f"{name} has {len(vs)} running canaries ({', '.join(vs)}); at most one may run"
                for name, vs in canaries.items() if len(vs) > 1]
        shadows: dict[str, list[str]] = {}
        for p in self.passports:
            if p.shadow:
                shadows.setdefault(p.name, []).append(p.version)
                if p.status == Status.ACTIVE:
                    out.append(f"{p.key} shadows itself: it is the active version")
        out += [f"{name} has {len(vs)} shadow versions ({', '.join(vs)}); at most one may be"
                for name, vs in shadows.items() if len(vs) > 1]
        for name, versions in self._by_name.items():
            try:
                unify(versions)
            except PolicyConflict as exc:
                out.append(f"{name}: {exc}")
        return out

    @cached_property
    def _claims(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {}
        for name in self._by_name:
            out.setdefault(name, set()).add(name)
            for alias in self.policy(name).aliases:
                out.setdefault(alias, set()).add(name)
        return {ident: frozenset(names) for ident, names in out.items()}

    def claims(self) -> dict[str, frozenset[str]]:
        """id -> the adapters claiming it: as their name or as one of their aliases (an alias is
        the adapter's, whichever version is active, so it keeps its id across promotions)."""
        return self._claims

    def owner(self, ident: str) -> str | None:
        """The adapter `ident` names: itself, or the adapter that has it as an alias. Raises
        AmbiguousId rather than choose between two claimants."""
        claimants = self._claims.get(ident, frozenset())
        if len(claimants) > 1:
            raise AmbiguousId(f"{ident!r} is claimed by {', '.join(sorted(claimants))}; the store must be fixed "
                              "(`loraserve adapters set-policy` to take the alias from one of them) before it "
                              "can be used")
        return next(iter(claimants), None)

    def find(self, adapter_id: str) -> Passport | None:
        """NAME (its active version, else its latest), ALIAS, or NAME@VERSION."""
        ident, _, version = adapter_id.partition("@")
        name = self.owner(ident)
        if name is None:
            return None
        if version:
            return self.get(name, version)
        return self.active(name) or (self.versions(name) or [None])[-1]

    def check_namespace(self, name: str, aliases: Iterable[str] = ()) -> None:
        """Refuse adapter `name` with `aliases` if its name or an alias is already another adapter's id."""
        claims = self._claims
        others = claims.get(name, frozenset()) - {name}
        if others:
            raise StoreError(f"name {name!r} is already an alias of {', '.join(sorted(others))}")
        for alias in aliases:
            if alias == name:
                raise StoreError(f"alias {alias!r} is the adapter's own name")
            others = claims.get(alias, frozenset()) - {name}
            if others:
                kind = "name" if alias in others else "alias"
                raise StoreError(f"alias {alias!r} is already the {kind} of {', '.join(sorted(others))}")



def parse_index(raw: bytes | str, where: str) -> Snapshot:
    """The index in `raw`, validated whole: every entry a valid passport (types, names, reserved
    ids), no version listed twice, at most one active version per name. Raises IndexInvalid
    naming what is wrong (`where`: the index's path or URL) rather than serve part of it."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise IndexInvalid(f"{where} is not JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("adapters"), list):
        raise IndexInvalid(f"{where} is not an object with an 'adapters' list")
    passports, problems = [], []
    for i, entry in enumerate(data["adapters"]):
        label = f"entry {i}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("version"), str):
            label = versioned(entry["name"], entry["version"])
        try:
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            passports.append(Passport.from_dict(entry))
        except (TypeError, ValueError) as exc:
            problems.append(f"{label}: {exc}")
    snap = Snapshot(tuple(passports))
    problems += snap.problems()
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise IndexInvalid(f"{where} is invalid: {'; '.join(problems[:3])}{more}")
    return snap


def with_changes(snap: Snapshot, changed: list[Passport]) -> list[Passport]:
    """Every version, `changed` replacing the versions they name, in index order."""
    keys = {p.key for p in changed}
    return sorted([p for p in snap.passports if p.key not in keys] + changed, key=lambda p: (p.name, int(p.version)))


def index_text(passports) -> str:
    return json.dumps({"generated": now_iso(), "adapters": [p.to_dict() for p in passports]}, indent=1) + "\n"
