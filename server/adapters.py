"""Adapter ids -> registry versions, with the checks that run before any load.

Ids are validated names (never paths): `name`, `alias` or `name@VERSION`, or
`base`; an id the store lets two adapters claim is refused, never guessed. The
registry index is re-read whenever it changes on disk (a local store: checked
on every look-up) or its ETag moves (a remote store: `poll`, every
--index-poll-s), so a promotion or rollback takes effect without a restart;
requests already resolved keep the version they got. An index that does not
validate is refused, counted and reported, and the last valid one keeps
serving: no request ever sees a half-understood index.

Every way into the engine passes `AdapterRegistry.gate` (through `resolve`):
requests, which may then fall back to the base model where allowed, and
`attachable`, for attaches nobody asked a request for (admin warm/pin,
--warm/--pin, scheduled warm-ups), which may not.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

from loraserve.contract import ADAPTER_ID, BASE_ADAPTER_ID
from loraserve.registry.identity import BaseIdentity
from loraserve.registry.errors import AmbiguousId, IndexInvalid, StoreError
from loraserve.registry.passport import Passport, Status
from loraserve.registry.prepare import PICKLE_WEIGHTS, WEIGHTS
from loraserve.registry.rollout import routed
from loraserve.registry.snapshot import Snapshot
from loraserve.registry.store import Store
from loraserve.scheduler.errors import (AdapterAmbiguous, AdapterIncompatible, AdapterNotActive, AdapterNotFound,
                              InvalidArgument, LoraServeError, PermissionDenied)
from loraserve.scheduler.types import BASE, AdapterRef
from loraserve.server.convert import check_adapter_id
from loraserve.server.rollouts import Split

log = logging.getLogger(__name__)
_UNREADABLE = "unreadable"
"""The stamp of a local index whose stat or read failed (an OSError)."""


@dataclass(frozen=True)
class Servable:
    """An adapter a client may use now: the version its id is served by ("" when none is active)
    and the other versions that could serve, each reachable as name@VERSION."""

    name: str
    version: str
    aliases: tuple[str, ...]
    others: tuple[str, ...]


@dataclass(frozen=True)
class Resolution:
    adapter: AdapterRef
    passport: Passport | None = None
    problem: LoraServeError | None = None
    """Why this version cannot serve (incompatible, not in service); scheduler/fallback.py decides
    whether the request is served by the base model instead."""
    split: Split | None = None
    """Set when a running canary routed this request (to the canary or to the stable version)."""


class AdapterRegistry:
    def __init__(self, store: Store, base: BaseIdentity, *, max_rank: int = 64):
        self.store = store
        self.polled = getattr(store, "remote", False)
        """A remote index changes only through `poll` (a look-up must not cost a request to the bucket)."""
        self.base = base
        self.max_rank = max_rank
        self.module_names: frozenset[str] = frozenset()
        """Leaf module names of the served model (set once it is loaded)."""
        self.lora_modules: frozenset[str] | None = None
        """Leaf names of the linear layers the engine applies LoRA to (set once it is loaded)."""
        self.reload_errors = 0
        """Indexes refused since start (each distinct one once): loraserve_registry_reload_errors_total."""
        self.index_error = ""
        """Why the store's current index is refused ('' when the index served is the current one)."""
        self._stamp: object = ()
        self._snapshot: Snapshot | None = None
        """The last index that validated: what is served while a newer one is refused."""
        self._aborted: set[tuple[str, str]] = set()
        """(canary version key, its started_at): canaries this process stopped routing to before
        the store says so."""

    def open(self) -> None:
        """The first read of the index; StoreError when there is no valid one to serve. Blocking."""
        if self.polled:
            self.poll()
        else:
            self.refresh()
        if self._snapshot is None:
            raise StoreError(f"the adapter store {self.store_name} has no valid index to serve: {self.index_error}")

    @property
    def store_name(self) -> str:
        return getattr(self.store, "url", None) or str(self.store.root)

    def snapshot(self) -> Snapshot:
        if not self.polled:
            self.refresh()
        return self._snapshot or Snapshot(())

    def current(self) -> Snapshot:
        """The index last applied, without looking for a newer one (the request's own look-up did)."""
        return self._snapshot or Snapshot(())

    def refresh(self) -> bool:
        """Re-read a local index if it changed on disk (by its stamp: inode, size, times, and the
        bytes' hash while it is young); whether a new one was applied."""
        stamp: object = _UNREADABLE
        try:
            stamp = self.store.index_stamp()
            if stamp == self._stamp:
                return False
            snap, stamp = self.store.read_index()
        except (StoreError, OSError) as exc:
            self._refuse(stamp, exc)  # the stamp from before the read: a newer index is read again
            return False
        return self._apply(snap, stamp)

    def poll(self) -> bool:
        """Re-read a remote index if its ETag moved (one HEAD; the GET only then); whether a new
        one was applied. Blocking: run it on a thread. Origin errors propagate (a failed poll)."""
        etag = self.store.index_stamp()
        if etag == self._stamp:
            return False
        try:
            snap, etag = self.store.read_index()
        except IndexInvalid as exc:
            self._refuse(etag, exc)
            return False
        if etag is None and self._snapshot is not None:
            self._refuse("", IndexInvalid(f"{self.store_name}/registry.json is gone"))
            return False
        return self._apply(snap, etag or "")

    def _apply(self, snap: Snapshot, stamp: object) -> bool:
        if self.index_error:
            log.warning("registry index of %s is valid again; serving it", self.store_name)
        self._snapshot, self._stamp, self.index_error = snap, stamp, ""
        return True

    def _refuse(self, stamp: object, exc: Exception) -> None:
        """Keep serving the last valid index. `stamp` is the refused one's, so it is not read again
        on every look-up; the same refusal seen again (its stamp changes as it ages out of the
        racy window, or a stat keeps failing) is counted and logged once."""
        again = self.index_error == str(exc)
        self._stamp, self.index_error = stamp, str(exc)
        if again:
            return
        self.reload_errors += 1
        kept = "no earlier valid index" if self._snapshot is None else "serving the last valid index"
        log.error("registry index refused (%s): %s", kept, exc)

    def example_id(self) -> str:
        """An id worth trying: the first active adapter's name, else the base model's."""
        return next((p.name for p in self.snapshot().passports if p.status == Status.ACTIVE), BASE_ADAPTER_ID)

    def refs(self) -> list[AdapterRef]:
        """Every version in the store."""
        return [self.ref_of(p) for p in self.snapshot().passports]

    def ref_of(self, p: Passport) -> AdapterRef:
        return AdapterRef(p.name, p.version, str(self.store.version_dir(p.name, p.version)), p.weights_sha256)

    def resolve(self, adapter_id: str, client: str | None = None, *, check_access: bool = True) -> Resolution:
        check_adapter_id(adapter_id)
        if adapter_id == BASE_ADAPTER_ID:
            return Resolution(BASE)
        match = ADAPTER_ID.fullmatch(adapter_id)
        snap = self.snapshot()
        try:
            name = snap.owner(match["name"])
        except AmbiguousId as exc:
            raise AdapterAmbiguous(adapter_id, str(exc)) from exc
        if name is None:
            raise AdapterNotFound(adapter_id)
        version = match["version"]
        passport = snap.get(name, version) if version else snap.active(name)
        if passport is None:
            if version:
                raise AdapterNotFound(adapter_id)
            raise AdapterNotActive(adapter_id, "no version is active (promote one)")
        split = None
        canary = None if version else snap.canary(name)
        if canary is not None and (canary.key, canary.canary.started_at) not in self._aborted:
            to_canary = routed(canary.canary, canary.key, client, random.random() * 100)
            split = Split(name, canary.version if to_canary else passport.version, canary.version,
                          passport.version, canary.canary.limits, canary.canary.started_at)
            passport = canary if to_canary else passport
        # Access, aliases and fallback are the adapter's, whichever version was named (registry.policy).
        passport = replace(passport, **snap.policy(name).fields())
        if check_access and passport.allowed_clients and client not in passport.allowed_clients:
            raise PermissionDenied(f"client {client or 'anonymous'!r} may not use adapter {adapter_id!r}",
                                   adapter_id=adapter_id, client=client or "")
        return Resolution(self.ref_of(passport), passport, self.gate(passport), split)

    def abort_canary(self, name: str, version: str) -> bool:
        """Stop routing to `name@version`'s running canary in this process (the store is told
        apart, by the caller); False when it is not running or already stopped."""
        canary = self.snapshot().canary(name)
        if canary is None or canary.version != version:
            return False
        stop = (canary.key, canary.canary.started_at)
        if stop in self._aborted:
            return False
        self._aborted.add(stop)
        return True

    def servable(self, client: str | None) -> list[Servable]:
        """Every adapter `client` may use (the access rule of `resolve`) with a version that passes `gate`."""
        snap, out = self.snapshot(), []
        for name in snap.names():
            policy = snap.policy(name)
            if policy.allowed_clients and client not in policy.allowed_clients:
                continue
            ok = [p.version for p in snap.versions(name) if self.gate(p) is None]
            active = snap.active(name)
            served = active.version if active is not None and active.version in ok else ""
            if ok:
                out.append(Servable(name, served, policy.aliases, tuple(v for v in ok if v != served)))
        return out

    def attachable(self, adapter_id: str) -> AdapterRef:
        """The version `adapter_id` names, if it may be attached now; else the typed reason."""
        found = self.resolve(adapter_id, check_access=False)
        if found.adapter.is_base:
            raise InvalidArgument("adapter_id", "'base' is the model itself and is always resident")
        if found.problem is not None:
            raise found.problem
        return found.adapter

    def gate(self, p: Passport) -> LoraServeError | None:
        """Why version `p` may not be attached here, or None: its status, its fit with the served
        base model, and files that are inside the store and hashed (the runner checks the hash,
        and the weights against their config, when it reads them). Its errors name the version
        (name@VERSION), as every error about a version does; those about the id asked for name that."""
        if p.status in (Status.ARCHIVED, Status.FAILED):
            return AdapterNotActive(p.key, f"it is {p.status}")
        if p.base_model_revision != self.base.revision:
            return AdapterIncompatible(p.key, f"it was trained for base model {p.base_model!r} revision "
                                       f"{p.base_model_revision[:12]}, but this server runs {self.base.model_id!r} "
                                       f"revision {self.base.revision[:12]}")
        if p.rank < 1:
            return AdapterIncompatible(p.key, "its passport records no rank read from its weights")
        if p.rank > self.max_rank:
            return AdapterIncompatible(p.key, f"rank {p.rank} exceeds the server's max_lora_rank {self.max_rank}")
        missing = [t for t in p.target_modules if self.module_names and t not in self.module_names]
        if missing:
            return AdapterIncompatible(p.key, f"target modules {missing} do not exist in the base model")
        unapplied = [t for t in p.target_modules if self.lora_modules is not None and t not in self.lora_modules]
        if unapplied:
            names = ", ".join(unapplied)
            return AdapterIncompatible(p.key, f"it adapts {names}, which this server does not apply LoRA to: "
                                       f"restart it with --lora-target-modules including {names}")
        if not p.weights_sha256:
            return AdapterIncompatible(p.key, "its passport records no weights_sha256")
        try:
            path = self.store.served_dir(p.name, p.version)
        except StoreError as exc:
            return AdapterIncompatible(p.key, str(exc))
        if not (path / WEIGHTS).is_file() and (path / PICKLE_WEIGHTS).is_file():
            return AdapterIncompatible(p.key, "only pickle weights are present; they are refused")
        return None  # a missing or unreadable weights file fails at load: ADAPTER_LOAD_FAILED
