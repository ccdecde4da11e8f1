"""The adapter store: its lifecycle (register, promote, rollback, canary, shadow, evaluate, archive,
set-policy), written once over the pure decisions of registry.plans, whichever backend holds it:
a local directory (registry.local: the index under a file lock) or an S3-compatible bucket
(registry.s3backend: the index under ETag compare-and-swap).

Why registry.json decides: promote, rollback and archive change several versions at once, and
only one write of one index changes them all in one step, so each operation is one atomic index
write. Passports are mirrored afterwards; a writer dying before the mirror leaves them behind, and
recovery (registry.reconcile) rewrites them from the index. Servers read only the index, so they
never see a half-made transition. An index that does not validate (registry.snapshot) is refused
whole, and the last valid one read keeps serving.

Every change is decided on the index as it is and written only if it still is: the local backend
holds its lock from the read to the write; the bucket's write is conditional on the ETag read and
a lost race (IndexMoved) is decided again on the new index.

A registration is prepared in a private staging directory (copied, checked, smoke-tested), given
the next version number the backend can claim, published complete (the files, then the passport)
and only then added to the index; so no version appears half-written.

Names and aliases share one namespace: an id names at most one adapter, and every operation that
would make one ambiguous is refused.
"""

from __future__ import annotations

import datetime as dt
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Protocol

from loraserve.registry.errors import MOVES, IndexMoved, StoreError
from loraserve.registry.evaluate import Gate
from loraserve.registry.identity import BaseIdentity
from loraserve.registry.local import LocalBackend
from loraserve.registry.passport import Evaluation, Passport, SmokeTest, Status
from loraserve.registry.plans import (plan_abort_canary, plan_archive, plan_canary, plan_gate, plan_promote, plan_registration,
                            plan_rollback, plan_set_policy, plan_shadow)
from loraserve.registry.policy import FIELDS as POLICY
from loraserve.registry.prepare import new_draft, prepare
from loraserve.registry.rollout import Canary, Shadow
from loraserve.registry.snapshot import Snapshot, with_changes

log = logging.getLogger(__name__)


class Backend(Protocol):
    """Where a store's index and versions live, and how a change reaches its index safely."""

    index_name: str
    """The index's path or URL, for messages."""

    def read_index(self) -> tuple[Snapshot, object | None]:
        """The index, validated, and what tells it from another (None: there is none yet);
        IndexInvalid when it does not validate."""

    def index_stamp(self) -> object:
        """What tells one index from another without reading it whole."""

    def version_dir(self, name: str, version: str) -> Path:
        """Where a server reads the version's files."""

    def served_dir(self, name: str, version: str) -> Path:
        """version_dir, once checked to lead nowhere else."""

    def deciding(self) -> AbstractContextManager[tuple[Snapshot, object]]:
        """The index to decide a change on, and the token a write of the change must present."""

    def commit(self, passports: list[Passport], changed: list[Passport], token: object) -> None:
        """Write the index of `passports`, then mirror `changed` into their passports; IndexMoved
        when the index is no longer the one `token` came with."""

    def staged(self) -> AbstractContextManager[Path]:
        """A private directory to prepare a registration in, removed afterwards."""

    def claim(self, name: str, snap: Snapshot) -> str:
        """A version number of `name` no other registration has or gets."""

    def published(self, stage: Path, draft: Passport) -> AbstractContextManager[None]:
        """The prepared version put in place complete under its number, for the block that adds it
        to the index (a backend may take it back when that fails)."""

    def recover(self) -> Snapshot:
        """Reconcile the index with the passports, finishing what a dead writer left."""

    def reindex(self) -> Snapshot:
        """Recover, rebuilding an index that does not validate from the passports."""


class Store:
    def __init__(self, backend: Backend):
        self.backend = backend

    @classmethod
    def local(cls, root: Path) -> Store:
        """The store in the directory `root` (created on the first write)."""
        return cls(LocalBackend(Path(root)))

    @classmethod
    def open(cls, root: Path) -> Store:
        """The local store at `root`, recovered from any interrupted operation if it exists."""
        store = cls.local(root)
        if store.backend.root.is_dir():
            store.recover()
        return store

    def __getattr__(self, name: str):
        # Reading the index and the versions is the backend's (Backend), and so is what only one
        # kind has: a directory's root and scan, a bucket's url, s3, cache_dir and materialize.
        if name == "backend":
            raise AttributeError(name)
        return getattr(self.backend, name)

    def snapshot(self) -> Snapshot:
        """The store as its index says (cheap; what servers use); IndexInvalid when the index does
        not validate."""
        return self.backend.read_index()[0]

    def stale(self, days: int, today: dt.datetime | None = None) -> list[Passport]:
        """Versions not active and trained more than `days` ago (by evaluation.trained_at, else
        their registration): candidates to delete."""
        today = today or dt.datetime.now(dt.timezone.utc)
        cutoff = today - dt.timedelta(days=days)
        return [p for p in self.snapshot().passports if p.status != Status.ACTIVE and p.trained < cutoff]

    # -- writing -----------------------------------------------------------------
    def _change(self, plan: Callable[[Snapshot], tuple]) -> tuple:
        """Decide with `plan` on the index as it is (result, changed passports) and write the change;
        if the index moved meanwhile, decide again on the new one."""
        for _ in range(MOVES):
            with self.backend.deciding() as (snap, token):
                result, changed = plan(snap)
                if not changed:
                    return result
                try:
                    self.backend.commit(with_changes(snap, changed), changed, token)
                except IndexMoved:
                    log.info("the index changed while deciding; deciding again on the new one")
                    continue
                return result
        raise StoreError(f"{self.backend.index_name} kept changing under {MOVES} tries; retry")

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
        with self.backend.staged() as stage:
            prepare(Path(source), stage, draft, smoke_test)
            return self._add(stage, draft, requested, change_policy)

    def _add(self, stage: Path, draft: Passport, requested: dict, change_policy: bool) -> Passport:
        def again(snap: Snapshot) -> tuple:
            if snap.get(draft.name, draft.version) is not None:
                return draft, []  # adopted by a reindex meanwhile
            # The namespace or the adapter's policy may have changed since: decided again on this index
            # (a changed policy rewrites the draft's passport with the others').
            return draft, [draft, *plan_registration(snap, draft, requested, change_policy)]

        with self.backend.deciding() as (snap, token):
            draft.version = self.backend.claim(draft.name, snap)
            others = plan_registration(snap, draft, requested, change_policy)
            if draft.evaluation.previous_version == "" and snap.active(draft.name):
                draft.evaluation.previous_version = snap.active(draft.name).key
            with self.backend.published(stage, draft):
                try:
                    self.backend.commit(with_changes(snap, [*others, draft]), others, token)
                except IndexMoved:
                    # Only a backend without a lock loses a race: nothing is held while deciding again.
                    self._change(again)
        return draft

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
