"""The adapter store in an S3-compatible bucket: the same index, passports and lifecycle as the
local store (registry.store), with the bucket's conditional writes where the local store has a
file lock.

    s3://BUCKET/PREFIX/
      registry.json                       THE source of truth, as locally
      NAME/VERSION/.claim                 created with If-None-Match: *: whoever creates it owns VERSION
      NAME/VERSION/adapter_config.json
      NAME/VERSION/adapter_model.safetensors
      NAME/VERSION/metadata.json          the passport, uploaded after the files it describes

Why a concurrent writer's change cannot be lost: every index write is a PUT with If-Match set to
the ETag of the index the change was decided on. If anyone wrote the index since, the ETag
differs and the PUT fails (412); the writer reads the new index, decides again on it (a
promotion of a version someone else archived meanwhile is then refused, as under the lock) and
retries. The ETag is the MD5 of the bytes (single-part PUT), so an equal ETag means the very
index the decision was made on (each index also carries its `generated` timestamp). The first
index is created with If-None-Match: *.

Why a version appears only complete: servers read only the index, and a registration adds its
version to the index after the claim, the files and the passport are uploaded. A writer that
dies before that leaves objects no index names (a claim, perhaps files and a passport): nobody
serves them, and the version number stays taken. `reindex` adopts versions whose passport
(uploaded last) exists but the index lacks, like local recovery. Passports mirror the index
after each change; a writer dying in between leaves them behind, and the index still decides.

Servers also read the weights of this store: `materialize` brings a version into a DiskCache,
verified against the passport's sha256.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from registry.diskcache import DiskCache
from registry.identity import BaseIdentity
from registry.evaluate import Gate
from registry.passport import PASSPORT_FILE, Evaluation, Passport, SmokeTest
from registry.s3 import S3, Conflict, NotFound, OriginError
from registry.policy import FIELDS as POLICY
from registry.rollout import Canary, Shadow
from registry.store import (CONFIG, INDEX, WEIGHTS, IndexInvalid, Snapshot, StoreError, index_text, new_draft,
                            parse_index, plan_abort_canary, plan_archive, plan_canary, plan_gate, plan_promote,
                            plan_registration, plan_rollback, plan_set_policy, plan_shadow, prepare, reconcile,
                            with_changes)

log = logging.getLogger(__name__)

CLAIM = ".claim"
_MAX_TRIES = 20


@dataclass(frozen=True)
class Fetched:
    """A version brought from the bucket into the disk cache: bytes and seconds (0 on a cache hit)."""

    bytes: int
    seconds: float

    @property
    def downloaded(self) -> bool:
        return self.bytes > 0


class S3Store:
    remote = True

    def __init__(self, s3: S3, cache_dir: Path):
        self.s3 = s3
        self.cache_dir = Path(cache_dir)
        """Where served copies live (a DiskCache's root): version_dir points there."""

    @property
    def url(self) -> str:
        return self.s3.location.url

    def version_dir(self, name: str, version: str) -> Path:
        return self.cache_dir / name / version

    def served_dir(self, name: str, version: str) -> Path:
        """The local copy's directory (the disk cache makes it; nothing in it leads elsewhere)."""
        return self.version_dir(name, version)

    # -- reading -----------------------------------------------------------------
    def read_index(self) -> tuple[Snapshot, str | None]:
        """The index, validated, and its ETag (None: no index yet, an empty store); IndexInvalid
        (run `adapters reindex`) when it does not validate."""
        try:
            raw, etag = self.s3.get(self.s3.key(INDEX))
        except NotFound as exc:
            if exc.code == "NoSuchBucket":
                raise
            return Snapshot(()), None
        return parse_index(raw, f"{self.url}/{INDEX}"), etag

    def snapshot(self) -> Snapshot:
        return self.read_index()[0]

    def index_stamp(self) -> str:
        """The index's ETag ('' when there is none): one HEAD."""
        return self.s3.etag(self.s3.key(INDEX)) or ""

    # -- writing -----------------------------------------------------------------
    def _change(self, plan: Callable[[Snapshot], tuple]) -> tuple:
        """Decide with `plan` on the current index and write the result conditionally; if another
        writer moved the index meanwhile, decide again on theirs."""
        for _ in range(_MAX_TRIES):
            snap, etag = self.read_index()
            result, changed = plan(snap)
            if not changed:
                return result
            passports = with_changes(snap, changed)
            try:
                self._write_index(passports, etag)
            except Conflict:
                log.info("the index changed while deciding; deciding again on the new one")
                continue
            self._mirror(changed)
            return result
        raise StoreError(f"{self.url}/{INDEX} kept changing under {_MAX_TRIES} tries; retry")

    def _write_index(self, passports: list[Passport], etag: str | None) -> None:
        self.s3.put(self.s3.key(INDEX), index_text(passports).encode(), if_match=etag, if_none_match=etag is None)

    def _mirror(self, passports: list[Passport]) -> None:
        for p in passports:
            self.s3.put(self.s3.key(p.name, p.version, PASSPORT_FILE), _passport_bytes(p))

    def promote(self, name: str, version: str, force: bool = False) -> Passport:
        return self._change(lambda snap: plan_promote(snap, name, version, force))

    def rollback(self, name: str) -> Passport:
        return self._change(lambda snap: plan_rollback(snap, name))

    def archive(self, name: str) -> list[Passport]:
        return self._change(lambda snap: plan_archive(snap, name))

    def canary(self, name: str, version: str, canary: Canary, force: bool = False) -> Passport:
        return self._change(lambda snap: plan_canary(snap, name, version, canary, force))

    def record_gate(self, name: str, version: str, gate: Gate) -> Passport:
        return self._change(lambda snap: plan_gate(snap, name, version, gate))

    def abort_canary(self, name: str, version: str, reason: str, figures: dict) -> Passport | None:
        return self._change(lambda snap: plan_abort_canary(snap, name, version, reason, figures))

    def shadow(self, name: str, version: str, shadow: Shadow | None) -> Passport:
        return self._change(lambda snap: plan_shadow(snap, name, version, shadow))

    def stale(self, days: int, today: dt.datetime | None = None) -> list[Passport]:
        today = today or dt.datetime.now(dt.timezone.utc)
        cutoff = today - dt.timedelta(days=days)
        return [p for p in self.snapshot().passports if p.status != "active" and p.trained < cutoff]

    def register(self, source: Path, name: str, base: BaseIdentity,
                 smoke_test: Callable[[Path], SmokeTest] | None, *, evaluation: Evaluation | None = None,
                 change_policy: bool = False, **fields) -> Passport:
        """As the local store's: prepared and smoke-tested in a local temporary directory, then
        uploaded under a claimed version number and added to the index."""
        requested = {f: fields.pop(f) for f in POLICY if f in fields}
        draft = new_draft(Path(source), name, base, evaluation, fields, requested)
        plan_registration(self.snapshot(), draft, requested, change_policy)
        with tempfile.TemporaryDirectory(prefix="loraserve-register-") as stage:
            prepare(Path(source), Path(stage), draft, smoke_test)
            return self._add(Path(stage), draft, requested, change_policy)

    def set_policy(self, name: str, reason: str = "", **requested) -> list[Passport]:
        return self._change(lambda snap: plan_set_policy(snap, name, requested, reason))

    def _indexed(self, draft: Passport) -> bool:
        """Whether the index names `draft` now; True when it cannot be read (keeping files the
        index may name is the safe side: a reindex settles it)."""
        try:
            return self.snapshot().get(draft.name, draft.version) is not None
        except OriginError:
            return True

    def _claimed(self, name: str) -> list[int]:
        """Version numbers with any object under them (claimed, even by a writer that died)."""
        under = self.s3.key(name) + "/"
        return [int(v) for v in {k[len(under):].split("/", 1)[0] for k in self.s3.keys(under)} if v.isdigit()]

    def _add(self, stage: Path, draft: Passport, requested: dict, change_policy: bool) -> Passport:
        snap = self.snapshot()
        version = max([*self._claimed(draft.name), *(int(p.version) for p in snap.versions(draft.name))],
                      default=0) + 1
        for _ in range(_MAX_TRIES):
            try:
                self.s3.put(self.s3.key(draft.name, str(version), CLAIM), b"", if_none_match=True)
                break
            except Conflict:
                version += 1  # another registration took it first
        else:
            raise StoreError(f"could not claim a version of {draft.name}; retry")
        draft.version = str(version)
        plan_registration(snap, draft, requested, change_policy)  # the uploaded passport's policy
        if draft.evaluation.previous_version == "" and snap.active(draft.name):
            draft.evaluation.previous_version = snap.active(draft.name).key
        keys = [self.s3.key(draft.name, draft.version, f) for f in (CONFIG, WEIGHTS, PASSPORT_FILE)]
        self.s3.upload(keys[0], stage / CONFIG)
        self.s3.upload(keys[1], stage / WEIGHTS)
        self.s3.put(keys[2], _passport_bytes(draft))

        def plan(snap: Snapshot):
            if snap.get(draft.name, draft.version) is not None:
                return draft, []  # adopted by a reindex meanwhile
            # The namespace or the adapter's policy may have changed since: decided again on this index
            # (a changed policy re-uploads the draft's passport with the others').
            others = plan_registration(snap, draft, requested, change_policy)
            return draft, [draft, *others]

        try:
            return self._change(plan)
        except OriginError as exc:
            if not isinstance(exc, Conflict) and self._indexed(draft):
                raise  # the index write landed before the error: the version is registered, keep its files
            for key in reversed(keys):
                self.s3.delete(key)
            raise
        except StoreError:
            # Refused on the index as it is now: the uploaded version must not be adopted later.
            for key in reversed(keys):
                self.s3.delete(key)
            raise

    # -- recovery ----------------------------------------------------------------
    def recover(self) -> Snapshot:
        """Reconcile the index with the passports in the bucket (as local recovery does), then
        mirror the index into passports that fell behind. Claims without a passport are left:
        a registration may still be uploading."""
        found = []
        under = self.s3.key("") + "/" if self.s3.location.prefix else ""
        for key in self.s3.keys(under):
            parts = key[len(under):].split("/")
            if len(parts) == 3 and parts[2] == PASSPORT_FILE and parts[1].isdigit():
                try:
                    p = Passport.from_dict(json.loads(self.s3.get(key)[0]))
                except (ValueError, TypeError, KeyError) as exc:
                    log.warning("ignoring %s: unreadable passport: %s", key, exc)
                    continue
                if (p.name, p.version) != (parts[0], parts[1]):
                    log.warning("ignoring %s: its passport says %s", key, p.key)
                    continue
                found.append(p)
        for _ in range(_MAX_TRIES):
            try:
                raw, etag = self.s3.get(self.s3.key(INDEX))
                indexed = {p.key: p.to_dict() for p in parse_index(raw, f"{self.url}/{INDEX}").passports}
            except NotFound:
                indexed, etag = None, None
            except IndexInvalid as exc:
                log.warning("%s; rebuilding it from the passports", exc)
                indexed, etag = None, self.s3.etag(self.s3.key(INDEX))
            passports, stale = reconcile(indexed, found)
            passports = sorted(passports, key=lambda p: (p.name, int(p.version)))
            if indexed is None or [p.to_dict() for p in passports] != list(indexed.values()):
                try:
                    self._write_index(passports, etag)
                except Conflict:
                    continue
            self._mirror(stale)
            return Snapshot(tuple(passports))
        raise StoreError(f"{self.url}/{INDEX} kept changing under {_MAX_TRIES} tries; retry")

    def reindex(self) -> Snapshot:
        return self.recover()

    # -- serving -----------------------------------------------------------------
    def materialize(self, cache: DiskCache, name: str, version: str, sha256: str, wait_s: float) -> Fetched:
        """Make `cache` hold a verified copy of name@version (its weights hashing to `sha256`) and
        lease it to the caller, who releases it once the weights are read. Raises OriginError
        (HashMismatch when the bucket's weights are not the registered ones) or DiskCacheFull."""
        if cache.lease(name, version, sha256):
            return Fetched(0, 0.0)
        started = time.perf_counter()
        keys = {f: self.s3.key(name, version, f) for f in (CONFIG, WEIGHTS)}
        sizes = {f: self._size(k) for f, k in keys.items()}
        with cache.filling(name, version, sha256, sum(sizes.values()), wait_s) as tmp:
            got = self.s3.download(keys[CONFIG], tmp / CONFIG)
            got += self.s3.download(keys[WEIGHTS], tmp / WEIGHTS, sha256)
        return Fetched(got, time.perf_counter() - started)

    def _size(self, key: str) -> int:
        return self.s3.head(key)["ContentLength"]


def _passport_bytes(p: Passport) -> bytes:
    return (json.dumps(p.to_dict(), indent=2) + "\n").encode()
