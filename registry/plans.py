"""The lifecycle's decisions: pure functions of a snapshot of the index, shared by every kind of
store. Each `plan_*` returns (what the operation answers, the passports it changes); the store
writes the changed ones in one index write, or nothing when the list is empty."""

from __future__ import annotations

from dataclasses import replace

from loraserve.contract import name_problem
from loraserve.registry.errors import StoreError
from loraserve.registry.evaluate import Gate
from loraserve.registry.passport import FALLBACKS, Passport, Status
from loraserve.registry.policy import Policy, history_entry
from loraserve.registry.rollout import Canary, CanaryState, Shadow
from loraserve.registry.snapshot import Snapshot, now_iso


def check_ids(name: str, aliases) -> None:
    """A name and aliases any adapter may take (letters, digits, '-', '_'; not reserved)."""
    for kind, ident in (("name", name), *(("alias", a) for a in aliases)):
        if (why := name_problem(ident)) is not None:
            raise StoreError(f"{kind} {why}")


def check_lineage(snap: Snapshot, draft: Passport) -> None:
    snap.check_namespace(draft.name)
    prev = draft.evaluation.previous_version
    if prev and snap.get(*prev.split("@")) is None:
        raise StoreError(f"previous_version {prev} is not in the store")


def plan_registration(snap: Snapshot, draft: Passport, requested: dict, change_policy: bool) -> list[Passport]:
    """Give `draft` its adapter's policy (registry.policy): a new adapter's is what `requested` says
    (defaults for the rest); a new version inherits its adapter's, and one that asks for another is
    refused unless `change_policy`, which changes it for every version. Returns the other versions
    whose passports change with it."""
    check_lineage(snap, draft)
    versions = snap.versions(draft.name)
    current = snap.policy(draft.name) if versions else Policy()
    wanted = current.with_changes(requested)
    snap.check_namespace(draft.name, wanted.aliases)
    trail = snap.history(draft.name)
    if not versions:
        trail = [history_entry(now_iso(), "register", wanted, draft.version)]
    elif wanted != current:
        if not change_policy:
            raise StoreError(f"this registration changes {draft.name}'s policy ({current.differences(wanted)}), which "
                             "belongs to the adapter and which every new version inherits: register without those "
                             f"flags, add --change-policy to change it for every version of {draft.name}, or use "
                             f"`loraserve adapters set-policy {draft.name}`")
        trail = trail + [history_entry(now_iso(), "register --change-policy", wanted, draft.version)]
    draft.allowed_clients, draft.aliases = list(wanted.allowed_clients), list(wanted.aliases)
    draft.fallback, draft.policy_history = wanted.fallback, trail
    if not versions or wanted == current:
        return []
    return [replace(p, **wanted.fields(), policy_history=trail) for p in versions]


def plan_set_policy(snap: Snapshot, name: str, requested: dict, reason: str) -> tuple[list[Passport], list[Passport]]:
    """Every version of `name` with the policy `requested` changes (None: unchanged), one line more
    in its policy history; nothing changes when nothing would."""
    versions = snap.versions(name)
    if not versions:
        raise StoreError(f"{name} is not in the store")
    if requested.get("fallback") not in (None, *FALLBACKS):
        raise StoreError(f"fallback must be one of {FALLBACKS}, not {requested['fallback']!r}")
    current = snap.policy(name)
    wanted = current.with_changes(requested)
    check_ids(name, wanted.aliases)
    snap.check_namespace(name, wanted.aliases)
    if wanted == current and all(Policy.of(p) == current for p in versions):
        return versions, []
    trail = snap.history(name) + [history_entry(now_iso(), "set-policy", wanted, reason=reason)]
    changed = [replace(p, **wanted.fields(), policy_history=trail) for p in versions]
    return changed, changed


def _servable(target: Passport) -> None:
    if target.status == Status.FAILED or not (target.smoke_test and target.smoke_test.passed):
        why = target.failure or "it has not passed a smoke test"
        raise StoreError(f"{target.key} cannot be promoted: {why}")


def gate_problem(snap: Snapshot, target: Passport) -> str:
    """Why the evaluation gate (registry.evaluate) keeps `target` from traffic ('' when it does
    not): its last evaluation failed or never finished, or it has none while its adapter has a
    test set (another version was given one)."""
    if target.gate is not None:
        return target.gate.problem()
    if any(p.gate is not None for p in snap.versions(target.name)):
        return (f"{target.name} has a test set and {target.key} was never evaluated on it: run `loraserve "
                f"adapters evaluate {target.name} {target.version}`")
    return ""


def _gated(snap: Snapshot, target: Passport, force: bool, change: str) -> Passport:
    """`target` if its gate lets it through; with `force`, target with the override in its history."""
    problem = gate_problem(snap, target)
    if not problem:
        return target
    if not force:
        raise StoreError(f"{target.key} cannot be promoted: {problem} (--force overrides, recorded in its history)")
    return replace(target, history=[*target.history, {"at": now_iso(), "change": f"{change} --force",
                                                      "reason": problem}])


def _end_canary(p: Passport, state: CanaryState, reason: str = "", figures: dict | None = None) -> Passport:
    return replace(p, canary=replace(p.canary, state=state, ended_at=now_iso(), reason=reason,
                                     figures=figures if figures is not None else p.canary.figures))


def plan_promote(snap: Snapshot, name: str, version: str, force: bool = False) -> tuple[Passport, list[Passport]]:
    """`version` becomes active; a running canary ends: completed if it was this version's. The
    evaluation gate must let it through, unless `force` (recorded in its history)."""
    target = snap.get(name, version)
    if target is None:
        raise StoreError(f"{name}@{version} is not in the store")
    if target.status == Status.ACTIVE:
        return target, []
    _servable(target)
    target = _gated(snap, target, force, "promote")
    running = snap.canary(name)
    if running is not None and running.key == target.key:
        target = _end_canary(target, CanaryState.COMPLETED, f"promoted {now_iso()}")
    changed = [replace(target, status=Status.ACTIVE, promoted_at=now_iso(), shadow=None)]
    if running is not None and running.key != target.key:
        changed.append(_end_canary(running, CanaryState.ENDED, f"{target.key} was promoted"))
    current = snap.active(name)
    if current is not None:
        changed.append(replace(current, status=Status.ARCHIVED))
    return changed[0], changed


def plan_canary(snap: Snapshot, name: str, version: str, canary: Canary,
                force: bool = False) -> tuple[Passport, list[Passport]]:
    """Route `canary.percent`% of the requests naming `name` to `version`, the rest to the active
    version; a canary already running for this version changes its share and limits."""
    target = snap.get(name, version)
    if target is None:
        raise StoreError(f"{name}@{version} is not in the store")
    active = snap.active(name)
    if active is None:
        raise StoreError(f"{name} has no active version to compare a canary with: promote one first")
    if target.status == Status.ACTIVE:
        raise StoreError(f"{target.key} is already the active version")
    if target.status != Status.STAGING:
        raise StoreError(f"{target.key} is {target.status}; only a staging version can be a canary")
    _servable(target)
    target = _gated(snap, target, force, "promote --canary")
    running = snap.canary(name)
    if running is not None and running.key != target.key:
        raise StoreError(f"{running.key} already has a running canary: `loraserve adapters rollback {name}` "
                         "ends it, `promote` completes it")
    if running is not None:
        canary = replace(canary, started_at=running.canary.started_at)
    changed = replace(target, canary=canary)
    return changed, [changed]


def plan_gate(snap: Snapshot, name: str, version: str, gate: Gate) -> tuple[Passport, list[Passport]]:
    """Record `gate` as `name@version`'s last evaluation."""
    target = snap.get(name, version)
    if target is None:
        raise StoreError(f"{name}@{version} is not in the store")
    changed = replace(target, gate=gate)
    return changed, [changed]


def plan_abort_canary(snap: Snapshot, name: str, version: str, reason: str,
                      figures: dict) -> tuple[Passport | None, list[Passport]]:
    """The server's automatic rollback: end `name@version`'s canary as aborted, with the figures
    that tripped it. Nothing changes (None) when that canary is no longer running."""
    running = snap.canary(name)
    if running is None or running.version != version:
        return None, []
    changed = _end_canary(running, CanaryState.ABORTED, reason, figures)
    return changed, [changed]


def plan_shadow(snap: Snapshot, name: str, version: str, shadow: Shadow | None) -> tuple[Passport, list[Passport]]:
    """`version` shadows `name`'s active version at `shadow.percent` (None: no longer); another
    version's shadow ends."""
    target = snap.get(name, version)
    if target is None:
        raise StoreError(f"{name}@{version} is not in the store")
    if shadow is not None:
        if target.status not in (Status.STAGING, Status.ARCHIVED):
            raise StoreError(f"{target.key} is {target.status}; only a staging or archived version can shadow")
        if snap.active(name) is None:
            raise StoreError(f"{name} has no active version to shadow")
        _servable(target)
    changed = [replace(target, shadow=shadow)]
    changed += [replace(p, shadow=None) for p in snap.versions(name) if p.shadow and p.key != target.key]
    return changed[0], changed


def plan_rollback(snap: Snapshot, name: str) -> tuple[Passport, list[Passport]]:
    """A running canary ends (the active version keeps serving everything); else the version
    active before the current one is re-activated (shadowing nothing) and the current one goes
    back to staging."""
    running = snap.canary(name)
    if running is not None:
        changed = _end_canary(running, CanaryState.ENDED, "rolled back")
        return snap.active(name), [changed]
    current = snap.active(name)
    if current is None:
        raise StoreError(f"{name} has no active version to roll back from")
    previous = [p for p in snap.versions(name) if p.status == Status.ARCHIVED and p.promoted_at]
    if not previous:
        raise StoreError(f"{name} has no earlier promoted version to roll back to")
    before = max(previous, key=lambda p: p.promoted_at)
    changed = [replace(before, status=Status.ACTIVE, shadow=None), replace(current, status=Status.STAGING, promoted_at="")]
    return changed[0], changed


def plan_archive(snap: Snapshot, name: str) -> tuple[list[Passport], list[Passport]]:
    versions = snap.versions(name)
    if not versions:
        raise StoreError(f"{name} is not in the store")
    changed = {p.key: replace(p, status=Status.ARCHIVED) for p in versions if p.status != Status.ARCHIVED}
    running = snap.canary(name)
    if running is not None:
        changed[running.key] = _end_canary(changed[running.key], CanaryState.ENDED, "archived")
    return [changed.get(p.key, p) for p in versions], list(changed.values())
