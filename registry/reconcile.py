"""Recovery's decisions, whatever holds the store: the index (what registry.json says of each
version's lifecycle and its adapter's policy) reconciled with the passports found beside the
versions. A pure function of the two, shared by every backend."""

from __future__ import annotations

import logging
from dataclasses import replace

from loraserve.registry.errors import StoreError
from loraserve.registry.passport import Passport, Status
from loraserve.registry.policy import FIELDS as POLICY, Policy, PolicyConflict, history_entry, history_of, unify
from loraserve.registry.snapshot import now_iso

log = logging.getLogger(__name__)

LIFECYCLE = ("status", "promoted_at")
INDEX_DECIDES = (*LIFECYCLE, *POLICY, "policy_history", "canary", "shadow", "gate", "history")
"""The passport fields registry.json decides (each is changed by an index write: promote, rollback,
archive, set-policy, canary, shadow, evaluate); every other field comes from the passport."""


def reconcile(indexed: dict[str, dict] | None, found: list[Passport]) -> tuple[list[Passport], list[Passport]]:
    """Recovery's decisions, whatever holds the store: the passports found take their lifecycle and
    their adapter's policy from the index (`indexed`: key -> entry, None when there is none),
    versions missing from it are adopted, entries without a passport dropped, at most one version
    per name stays active, and versions of one adapter that disagree on its policy (a store
    written before policies were the adapter's) get the one registry.policy.unify reads.
    Returns (every version, the passports to rewrite)."""
    passports, stale = [], {}
    for p in found:
        entry = (indexed or {}).get(p.key)
        mine = p.to_dict()
        if entry is None:
            if indexed is not None:
                log.warning("adopting %s (status %s): its directory is complete but the index lacked it",
                            p.key, p.status)
        elif any(mine[f] != entry[f] for f in INDEX_DECIDES):
            log.warning("%s: its passport disagrees with registry.json (status %s there); the index decides",
                        p.key, entry["status"])
            p = Passport.from_dict({**mine, **{f: entry[f] for f in INDEX_DECIDES}})
            stale[p.key] = p
        passports.append(p)
    for key in sorted(set(indexed or {}) - {p.key for p in passports}):
        log.warning("dropping %s from registry.json: its directory or passport is gone", key)
    out = []
    for p in passports:
        rivals = [q for q in passports if q.name == p.name and q.status == Status.ACTIVE]
        if p.status == Status.ACTIVE and len(rivals) > 1:
            keep = max(rivals, key=lambda q: (q.promoted_at, int(q.version)))
            if p is not keep:
                log.warning("%s and %s are both active; keeping the later promoted %s, archiving %s",
                            p.key, keep.key, keep.key, p.key)
                p = replace(p, status=Status.ARCHIVED)
                stale[p.key] = p
        out.append(p)
    for name in sorted({p.name for p in out}):
        versions = [p for p in out if p.name == name]
        if len({(Policy.of(p), len(p.policy_history)) for p in versions}) == 1:
            continue
        try:
            policy = unify(versions)
        except PolicyConflict as exc:
            raise StoreError(f"{name}: {exc}") from exc
        trail = history_of(versions) + [history_entry(now_iso(), "unified", policy)]
        log.warning("%s: its versions disagreed on its policy; every version now has %s", name, policy.fields())
        for p in versions:
            stale[p.key] = replace(p, **policy.fields(), policy_history=trail)
    out = [stale.get(p.key, p) for p in out]
    return out, list(stale.values())
