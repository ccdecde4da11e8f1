"""Who may use an adapter, by which other names, and whether it may fall back to the base model:
facts about the adapter, not about one of its versions.

Every version's passport carries its adapter's policy (allowed_clients, aliases, fallback) and the
history of its changes, the same on each version: a new version inherits them, and only
`adapters set-policy` (or a registration that passes --change-policy) changes them, for every
version in one index write. So promoting or rolling back never changes who may call an adapter or
what its aliases name.

A store written before this may hold versions that disagree. `unify` is the one reading of such a
store, for servers and writers alike, and it never grants more than some version granted: aliases
are the union over the versions (each already claimed its ids in the one namespace), fallback is
"base" only where every version says so, and access is the intersection of the lists of the
versions that restrict it. Restrictions with no client in common cannot be narrowed into one list
(an empty one means everybody): such an index does not validate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from loraserve.registry.passport import Passport

FIELDS = ("allowed_clients", "aliases", "fallback")


class PolicyConflict(ValueError):
    """An adapter's versions restrict access to clients that have none in common."""


@dataclass(frozen=True)
class Policy:
    allowed_clients: tuple[str, ...] = ()
    """Empty: every client."""
    aliases: tuple[str, ...] = ()
    fallback: str = "fail"

    @classmethod
    def of(cls, p: Passport) -> Policy:
        return cls(tuple(p.allowed_clients), tuple(p.aliases), p.fallback)

    def with_changes(self, requested: dict) -> Policy:
        """This policy with the fields `requested` names (None or absent: unchanged)."""
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in requested.items()
                 if k in FIELDS and v is not None}
        return replace(self, **given)

    def fields(self) -> dict:
        """As a passport holds it."""
        return {"allowed_clients": list(self.allowed_clients), "aliases": list(self.aliases),
                "fallback": self.fallback}

    def differences(self, other: Policy) -> str:
        """What `other` changes, e.g. "aliases [] -> ['law']"."""
        return ", ".join(f"{f} {_show(getattr(self, f))} -> {_show(getattr(other, f))}"
                         for f in FIELDS if getattr(self, f) != getattr(other, f))


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


def unify(versions: Iterable[Passport]) -> Policy:
    """The adapter's policy read from its versions (see the module's note); PolicyConflict when
    their access lists cannot be narrowed into one."""
    versions = list(versions)
    aliases = list(dict.fromkeys(a for p in versions for a in p.aliases))
    fallback = "base" if versions and all(p.fallback == "base" for p in versions) else "fail"
    lists = [p for p in versions if p.allowed_clients]
    allowed: list[str] = []
    if lists:
        common = set.intersection(*(set(p.allowed_clients) for p in lists))
        if not common:
            raise PolicyConflict(", ".join(f"{p.key} allows only {p.allowed_clients}" for p in lists)
                                 + ": no client is allowed by all; edit registry.json or the passports so they "
                                 "agree (then `loraserve adapters reindex`)")
        allowed = [c for c in lists[0].allowed_clients if c in common]
    return Policy(tuple(allowed), tuple(aliases), fallback)


def history_of(versions: Iterable[Passport]) -> list[dict]:
    """The adapter's policy history: the longest any version carries (they agree once written)."""
    return max((p.policy_history for p in versions), key=len, default=[])


def history_entry(at: str, change: str, policy: Policy, version: str = "", reason: str = "") -> dict:
    """One line of an adapter's policy history: when, what did it, and the policy after it."""
    out = {"at": at, "change": change, **policy.fields()}
    if version:
        out["version"] = version
    if reason:
        out["reason"] = reason
    return out
