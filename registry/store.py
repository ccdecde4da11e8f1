"""The adapter store on disk, and its lifecycle operations.

    ROOT/
      registry.json            THE source of truth for which versions exist and their status
      .lock                    flock held by every writer (CLI, recovery), one at a time
      .staging/                registrations being prepared (removed when their writer died)
      NAME/
        VERSION/               1, 2, 3 ... one self-contained directory per version
          adapter_config.json
          adapter_model.safetensors
          metadata.json        the passport (registry.passport): facts about this version

Why registry.json decides: promote, rollback and archive change several versions at once,
and only a single file replaced with os.replace changes them all in one step, so each is one
atomic write of the index. Passports are mirrored afterwards; a crash before the mirror
leaves them behind, and recovery rewrites them from the index. Servers read only the index,
so they never see a half-made transition.

A registration is prepared under .staging/ (copied, checked, smoke-tested, fsynced) and
renamed into NAME/VERSION complete, then added to the index; a version directory therefore
never appears half-written. A crash between the rename and the index write leaves a complete
version that recovery adopts with the status its passport records (staging or failed).

Recovery (`recover`, run by every writer first, by `reindex`, when the CLI opens the store and
at server start) removes staging leftovers and version directories without a passport, takes
each version's facts from its passport and its lifecycle (status, promoted_at) from the index,
adopts versions missing from the index, drops index entries whose directory is gone, keeps at
most one active version per name, and logs every decision. Deleting registry.json loses only
what passports have not yet mirrored. An index that does not validate (parse_index) is no crash's
doing, since every write of it is atomic: recovery refuses it and only `reindex` rebuilds it from
the passports, so nobody (server or writer) decides anything from a damaged index.

Names and aliases share one namespace: an id names at most one adapter, and every operation
that would make one ambiguous is refused. Every path read resolves inside the root.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator

from registry.durable import flocked, fsync_dir, fsync_file, write_atomic
from registry.identity import BaseIdentity, sha256_file
from loraserve.contract import NAME, name_problem, versioned
from registry.evaluate import Gate
from registry.passport import FALLBACKS, PASSPORT_FILE, Evaluation, Passport, SmokeTest
from registry.rollout import Canary, Shadow
from registry.policy import FIELDS as POLICY, Policy, PolicyConflict, history_entry, history_of, unify
from registry.weights import WeightsError, check_against_config, weight_facts

log = logging.getLogger(__name__)

INDEX = "registry.json"
LOCK = ".lock"
STAGING = ".staging"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
LIFECYCLE = ("status", "promoted_at")
INDEX_DECIDES = (*LIFECYCLE, *POLICY, "policy_history", "canary", "shadow", "gate", "history")
"""The passport fields registry.json decides (each is changed by an index write: promote, rollback,
archive, set-policy, canary, shadow, evaluate); every other field comes from the passport."""
RACY_S = 2.0
"""Timestamps can be this coarse (FAT 2 s; ext3, HFS+ and some network filesystems 1 s): a rewrite
of the same size within one tick keeps inode, size, mtime and ctime. While the index is younger
than this its stamp also hashes its bytes (git's "racily clean" rule)."""


class StoreError(Exception):
    """A lifecycle operation refused, with the reason people need to fix it."""


class AmbiguousId(StoreError):
    """An id names more than one adapter (possible only in a store edited by hand)."""


class IndexInvalid(StoreError):
    """registry.json is not an index anything may be served or decided from; the message says why."""


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
        return next((p for p in self._by_name.get(name, ()) if p.status == "active"), None)

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
            if p.status == "active":
                active.setdefault(p.name, []).append(p.version)
        out += [f"{name} has {len(vs)} active versions ({', '.join(vs)}); at most one may be"
                for name, vs in active.items() if len(vs) > 1]
        canaries: dict[str, list[str]] = {}
        for p in self.passports:
            if p.canary and p.canary.running:
                canaries.setdefault(p.name, []).append(p.version)
                if p.status != "staging" or p.name not in active:
                    out.append(f"{p.key} has a running canary but is {p.status}"
                               + ("" if p.name in active else f" and {p.name} has no active version"))
        out += [f"{name} has {len(vs)} running canaries ({', '.join(vs)}); at most one may run"
                for name, vs in canaries.items() if len(vs) > 1]
        shadows: dict[str, list[str]] = {}
        for p in self.passports:
            if p.shadow:
                shadows.setdefault(p.name, []).append(p.version)
                if p.status == "active":
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


def _adapter_config(version_dir: Path) -> dict:
    try:
        config = json.loads((version_dir / CONFIG).read_text())
    except ValueError as exc:
        raise WeightsError(f"{CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{CONFIG} is not a JSON object")
    return config


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
        rivals = [q for q in passports if q.name == p.name and q.status == "active"]
        if p.status == "active" and len(rivals) > 1:
            keep = max(rivals, key=lambda q: (q.promoted_at, int(q.version)))
            if p is not keep:
                log.warning("%s and %s are both active; keeping the later promoted %s, archiving %s",
                            p.key, keep.key, keep.key, p.key)
                p = replace(p, status="archived")
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


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def open(cls, root: Path) -> Store:
        """The store at `root`, recovered from any interrupted operation if it exists."""
        store = cls(root)
        if store.root.is_dir():
            store.recover()
        return store

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def confined(self, path: Path) -> Path:
        """`path` resolved; StoreError if it (or a symlink on the way) leads outside the root."""
        real = Path(path).resolve()
        if not real.is_relative_to(self.root.resolve()):
            raise StoreError(f"{path} resolves to {real}, outside the adapter store {self.root}")
        return real

    def served_dir(self, name: str, version: str) -> Path:
        """The version's directory, once it and the files a server reads are confined to the root."""
        path = self.version_dir(name, version)
        for p in (path, path / CONFIG, path / WEIGHTS, path / PICKLE_WEIGHTS):
            self.confined(p)
        return path

    # -- reading -----------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The store as registry.json says (cheap; what servers use), else as its passports say;
        IndexInvalid when the index does not validate."""
        return self.read_index()[0]

    def read_index(self) -> tuple[Snapshot, tuple | None]:
        """The index, validated, and the stamp of the very bytes read (None: there is no index and
        the passports say); IndexInvalid when it does not validate."""
        path = self.confined(self.root / INDEX)
        try:
            with open(path, "rb") as f:
                raw, st = f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            snap = self.scan()
            if problems := snap.problems():
                raise IndexInvalid(f"{self.root} has no {INDEX} and its passports do not make one: "
                                   + "; ".join(problems[:3])) from None
            return snap, None
        return parse_index(raw, str(path)), file_stamp(st, lambda: raw)

    def scan(self) -> Snapshot:
        """The passports on disk (lifecycle fields possibly behind the index after a crash)."""
        return Snapshot(tuple(p for p, _ in self._on_disk(clean=False)))

    def index_stamp(self) -> tuple | None:
        """What tells one index from another without parsing it (None: there is none)."""
        path = self.root / INDEX
        try:
            return file_stamp(os.stat(path), path.read_bytes)
        except FileNotFoundError:
            return None

    def _on_disk(self, clean: bool) -> Iterator[tuple[Passport, Path]]:
        """Readable passports in NAME/VERSION directories. With `clean`, directories without
        one (a crash of an older writer, or a hand copy gone wrong) are removed."""
        if not self.root.is_dir():
            return
        for name_dir in sorted(self.root.iterdir()):
            if not (NAME.fullmatch(name_dir.name) and name_dir.is_dir()):
                continue
            try:
                self.confined(name_dir)
            except StoreError as exc:
                log.warning("ignoring %s: %s", name_dir, exc)
                continue
            for vdir in sorted(name_dir.iterdir(), key=lambda d: d.name):
                if not vdir.name.isdigit():
                    continue
                try:
                    self.confined(vdir / PASSPORT_FILE)
                except StoreError as exc:
                    log.warning("ignoring %s: %s", vdir, exc)
                    continue
                if not (vdir / PASSPORT_FILE).is_file():
                    if clean and vdir.is_dir() and not vdir.is_symlink():
                        log.warning("removing %s: a version directory without a passport (an interrupted write)",
                                    vdir)
                        shutil.rmtree(vdir)
                    continue
                try:
                    p = Passport.read(vdir)
                except (ValueError, TypeError, KeyError) as exc:
                    log.warning("ignoring %s: unreadable passport: %s", vdir, exc)
                    continue
                if (p.name, p.version) != (name_dir.name, vdir.name):
                    log.warning("ignoring %s: its passport says %s", vdir, p.key)
                    continue
                yield p, vdir

    # -- writing -----------------------------------------------------------------
    @contextmanager
    def _writing(self, rebuild: bool = False) -> Iterator[Snapshot]:
        """The store lock, and the recovered state to change."""
        self.root.mkdir(parents=True, exist_ok=True)
        with flocked(self.root / LOCK):
            yield self._recover(rebuild)

    def recover(self) -> Snapshot:
        with self._writing() as snap:
            return snap

    def reindex(self) -> Snapshot:
        """Rebuild registry.json from the passports (after editing the store by hand, or when the
        index does not validate); lifecycle fields stay as a valid index has them (use
        promote/rollback/archive to change those)."""
        with self._writing(rebuild=True) as snap:
            return snap

    def _recover(self, rebuild: bool) -> Snapshot:
        """An index that does not validate was not left by a crash (every write of it is atomic):
        someone edited or damaged it. Only an explicit `reindex` (`rebuild`) replaces it."""
        self._clean_staging()
        try:
            raw = self.confined(self.root / INDEX).read_bytes()
            indexed = {p.key: p.to_dict() for p in parse_index(raw, str(self.root / INDEX)).passports}
        except FileNotFoundError:
            indexed = None
        except StoreError as exc:
            if not rebuild:
                raise IndexInvalid(f"{exc}; fix it, or run `loraserve adapters reindex` to rebuild it from the "
                                   "passports") from exc
            log.warning("%s; rebuilding it from the passports", exc)
            indexed = None
        passports, stale = reconcile(indexed, [p for p, _ in self._on_disk(clean=True)])
        return self._commit(passports, [(p, self.version_dir(p.name, p.version)) for p in stale],
                            force=indexed is None)

    def _commit(self, passports: list[Passport], mirror: list[tuple[Passport, Path]],
                force: bool = True) -> Snapshot:
        """Write the index (the transition itself), then mirror the changed passports."""
        passports = sorted(passports, key=lambda p: (p.name, int(p.version)))
        old = None
        if not force:
            try:
                old = json.loads((self.root / INDEX).read_text())["adapters"]
            except (OSError, ValueError, KeyError):
                pass
        if force or old != [p.to_dict() for p in passports]:
            write_atomic(self.root / INDEX, index_text(passports))
        for p, vdir in mirror:
            p.write(vdir)
        return Snapshot(tuple(passports))

    def _clean_staging(self) -> None:
        staging = self.root / STAGING
        if not staging.is_dir():
            return
        with flocked(self.root / (STAGING + ".lock"), blocking=False) as nobody_staging:
            if not nobody_staging:
                return  # a registration is under way; its leftovers (if any) wait for the next recovery
            for leftover in staging.iterdir():
                log.warning("removing %s: an interrupted registration", leftover)
                shutil.rmtree(leftover, ignore_errors=True)

    def _transition(self, snap: Snapshot, changed: list[Passport]) -> Snapshot:
        return self._commit(with_changes(snap, changed), [(p, self.version_dir(p.name, p.version)) for p in changed])

    # -- lifecycle -------------------------------------------------------------
    def register(self, source: Path, name: str, base: BaseIdentity,
                 smoke_test: Callable[[Path], SmokeTest] | None, *, evaluation: Evaluation | None = None,
                 change_policy: bool = False, **fields) -> Passport:
        """Copy a PEFT adapter directory in as the next version of `name`, read its facts from the
        tensors, hash it, smoke-test it (unless `smoke_test` is None) and write its passport:
        `staging` if every check passed, else `failed` with the reason in `failure`. Policy fields
        (allowed_clients, aliases, fallback; None or absent: as the adapter has them) set a new
        adapter's policy; a new version inherits its adapter's, and one that asks for another is
        refused unless `change_policy` (plan_registration)."""
        requested = {f: fields.pop(f) for f in POLICY if f in fields}
        draft = new_draft(Path(source), name, base, evaluation, fields, requested)
        plan_registration(self.snapshot(), draft, requested, change_policy)  # early: a doomed one costs nothing
        self.root.mkdir(parents=True, exist_ok=True)
        with self._staged() as stage:
            prepare(Path(source), stage, draft, smoke_test)
            return self._add(stage, draft, requested, change_policy)

    @contextmanager
    def _staged(self) -> Iterator[Path]:
        """A private directory under .staging/, shared-locked so recovery leaves it alone."""
        (self.root / STAGING).mkdir(exist_ok=True)
        with flocked(self.root / (STAGING + ".lock"), shared=True):
            stage = self.root / STAGING / uuid.uuid4().hex
            stage.mkdir()
            try:
                yield stage
            finally:
                shutil.rmtree(stage, ignore_errors=True)

    def _add(self, stage: Path, draft: Passport, requested: dict, change_policy: bool) -> Passport:
        with self._writing() as snap:
            name_dir = self.root / draft.name
            on_disk = [int(d.name) for d in name_dir.iterdir() if d.name.isdigit()] if name_dir.is_dir() else []
            draft.version = str(max([*on_disk, *(int(p.version) for p in snap.versions(draft.name))], default=0) + 1)
            others = plan_registration(snap, draft, requested, change_policy)
            if draft.evaluation.previous_version == "" and snap.active(draft.name):
                draft.evaluation.previous_version = snap.active(draft.name).key
            draft.write(stage)
            fsync_dir(stage)
            name_dir.mkdir(exist_ok=True)
            fsync_dir(self.root)
            stage.rename(self.version_dir(draft.name, draft.version))
            fsync_dir(name_dir)
            self._commit([*with_changes(snap, others), draft],
                         [(p, self.version_dir(p.name, p.version)) for p in others])
        return draft

    def _change(self, plan: Callable[[Snapshot], tuple]) -> tuple:
        """Under the lock: `plan` decides from the current state (result, changed passports)."""
        with self._writing() as snap:
            result, changed = plan(snap)
            if changed:
                self._transition(snap, changed)
            return result

    def promote(self, name: str, version: str, force: bool = False) -> Passport:
        return self._change(lambda snap: plan_promote(snap, name, version, force))

    def rollback(self, name: str) -> Passport:
        """End a running canary; else re-activate the version that was active before the current
        one, the current one going back to staging."""
        return self._change(lambda snap: plan_rollback(snap, name))

    def canary(self, name: str, version: str, canary: Canary, force: bool = False) -> Passport:
        return self._change(lambda snap: plan_canary(snap, name, version, canary, force))

    def record_gate(self, name: str, version: str, gate: Gate) -> Passport:
        return self._change(lambda snap: plan_gate(snap, name, version, gate))

    def abort_canary(self, name: str, version: str, reason: str, figures: dict) -> Passport | None:
        return self._change(lambda snap: plan_abort_canary(snap, name, version, reason, figures))

    def shadow(self, name: str, version: str, shadow: Shadow | None) -> Passport:
        return self._change(lambda snap: plan_shadow(snap, name, version, shadow))

    def archive(self, name: str) -> list[Passport]:
        """Take every version of `name` out of service (the files stay)."""
        return self._change(lambda snap: plan_archive(snap, name))

    def set_policy(self, name: str, reason: str = "", **requested) -> list[Passport]:
        """Change adapter `name`'s allowed_clients, aliases or fallback (None: unchanged) for every
        version at once, recorded in its policy history."""
        return self._change(lambda snap: plan_set_policy(snap, name, requested, reason))

    def stale(self, days: int, today: dt.datetime | None = None) -> list[Passport]:
        """Versions not active and trained more than `days` ago (by evaluation.trained_at, else
        their registration): candidates to delete."""
        today = today or dt.datetime.now(dt.timezone.utc)
        cutoff = today - dt.timedelta(days=days)
        return [p for p in self.snapshot().passports if p.status != "active" and p.trained < cutoff]


# -- lifecycle decisions: pure functions of a snapshot, shared by every kind of store ---------
def new_draft(source: Path, name: str, base: BaseIdentity, evaluation: Evaluation | None, fields: dict,
              requested: dict) -> Passport:
    """The passport a registration starts from, once `source` looks like a safetensors PEFT adapter
    (its policy is given by plan_registration)."""
    check_ids(name, requested.get("aliases") or ())
    if not (source / CONFIG).is_file():
        raise StoreError(f"{source} has no {CONFIG}: not a PEFT adapter directory")
    if not (source / WEIGHTS).is_file():
        if (source / PICKLE_WEIGHTS).is_file():
            raise StoreError(f"{source} has only pickle weights ({PICKLE_WEIGHTS}), which can run code when "
                             "loaded; convert them to safetensors first")
        raise StoreError(f"{source} has no {WEIGHTS}")
    if requested.get("fallback") not in (None, *FALLBACKS):
        raise StoreError(f"fallback must be one of {FALLBACKS}, not {requested['fallback']!r}")
    return Passport(name=name, version="0", base_model=base.model_id, base_model_revision=base.revision,
                    weights_sha256="", created=now_iso(), evaluation=evaluation or Evaluation(), **fields)


def check_ids(name: str, aliases) -> None:
    """A name and aliases any adapter may take (letters, digits, '-', '_'; not reserved)."""
    for kind, ident in (("name", name), *(("alias", a) for a in aliases)):
        if (why := name_problem(ident)) is not None:
            raise StoreError(f"{kind} {why}")


def prepare(source: Path, stage: Path, draft: Passport, smoke_test: Callable[[Path], SmokeTest] | None) -> None:
    """Copy the adapter into the private directory `stage`, hash it, read its facts from the
    tensors and smoke-test it; `draft` records the outcome (status staging, or failed and why)."""
    for f in (CONFIG, WEIGHTS):
        shutil.copyfile(source / f, stage / f)
        fsync_file(stage / f)
    draft.weights_sha256 = sha256_file(stage / WEIGHTS)
    try:
        facts = weight_facts(stage / WEIGHTS)
        draft.rank, draft.ranks, draft.dtype = facts.rank, facts.leaf_ranks(), facts.dtype
        draft.target_modules = facts.target_modules
        check_against_config(facts, _adapter_config(stage))
    except WeightsError as exc:
        draft.failure = str(exc)
    if not draft.failure and smoke_test is not None:
        draft.smoke_test = smoke_test(stage)
        if not draft.smoke_test.passed:
            draft.failure = f"smoke test failed: {draft.smoke_test.error}"
    draft.status = "failed" if draft.failure else "staging"


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
    if target.status == "failed" or not (target.smoke_test and target.smoke_test.passed):
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


def _end_canary(p: Passport, state: str, reason: str = "", figures: dict | None = None) -> Passport:
    return replace(p, canary=replace(p.canary, state=state, ended_at=now_iso(), reason=reason,
                                     figures=figures if figures is not None else p.canary.figures))


def plan_promote(snap: Snapshot, name: str, version: str, force: bool = False) -> tuple[Passport, list[Passport]]:
    """`version` becomes active; a running canary ends: completed if it was this version's. The
    evaluation gate must let it through, unless `force` (recorded in its history)."""
    target = snap.get(name, version)
    if target is None:
        raise StoreError(f"{name}@{version} is not in the store")
    if target.status == "active":
        return target, []
    _servable(target)
    target = _gated(snap, target, force, "promote")
    running = snap.canary(name)
    if running is not None and running.key == target.key:
        target = _end_canary(target, "completed", f"promoted {now_iso()}")
    changed = [replace(target, status="active", promoted_at=now_iso(), shadow=None)]
    if running is not None and running.key != target.key:
        changed.append(_end_canary(running, "ended", f"{target.key} was promoted"))
    current = snap.active(name)
    if current is not None:
        changed.append(replace(current, status="archived"))
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
    if target.status == "active":
        raise StoreError(f"{target.key} is already the active version")
    if target.status != "staging":
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
    changed = _end_canary(running, "aborted", reason, figures)
    return changed, [changed]


def plan_shadow(snap: Snapshot, name: str, version: str, shadow: Shadow | None) -> tuple[Passport, list[Passport]]:
    """`version` shadows `name`'s active version at `shadow.percent` (None: no longer); another
    version's shadow ends."""
    target = snap.get(name, version)
    if target is None:
        raise StoreError(f"{name}@{version} is not in the store")
    if shadow is not None:
        if target.status not in ("staging", "archived"):
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
        changed = _end_canary(running, "ended", "rolled back")
        return snap.active(name), [changed]
    current = snap.active(name)
    if current is None:
        raise StoreError(f"{name} has no active version to roll back from")
    previous = [p for p in snap.versions(name) if p.status == "archived" and p.promoted_at]
    if not previous:
        raise StoreError(f"{name} has no earlier promoted version to roll back to")
    before = max(previous, key=lambda p: p.promoted_at)
    changed = [replace(before, status="active", shadow=None), replace(current, status="staging", promoted_at="")]
    return changed[0], changed


def plan_archive(snap: Snapshot, name: str) -> tuple[list[Passport], list[Passport]]:
    versions = snap.versions(name)
    if not versions:
        raise StoreError(f"{name} is not in the store")
    changed = {p.key: replace(p, status="archived") for p in versions if p.status != "archived"}
    running = snap.canary(name)
    if running is not None:
        changed[running.key] = _end_canary(changed[running.key], "ended", "archived")
    return [changed.get(p.key, p) for p in versions], list(changed.values())


def with_changes(snap: Snapshot, changed: list[Passport]) -> list[Passport]:
    """Every version, `changed` replacing the versions they name, in index order."""
    keys = {p.key for p in changed}
    return sorted([p for p in snap.passports if p.key not in keys] + changed, key=lambda p: (p.name, int(p.version)))


def file_stamp(st: os.stat_result, content: Callable[[], bytes]) -> tuple:
    """inode, size, mtime and ctime (os.utime cannot set ctime), and the bytes' hash while racy."""
    racy = time.time() - max(st.st_mtime, st.st_ctime) < RACY_S
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            hashlib.sha256(content()).hexdigest() if racy else "")


def index_text(passports) -> str:
    return json.dumps({"generated": now_iso(), "adapters": [p.to_dict() for p in passports]}, indent=1) + "\n"
