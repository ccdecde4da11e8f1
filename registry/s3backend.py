"""The S3 backend: the store in an S3-compatible bucket, the same index and passports as a local
directory's (registry.local), with the bucket's conditional writes where a directory has a file lock.

    s3://BUCKET/PREFIX/
      registry.json                       THE source of truth, as locally
      NAME/VERSION/.claim                 created with If-None-Match: *: whoever creates it owns VERSION
      NAME/VERSION/adapter_config.json
      NAME/VERSION/adapter_model.safetensors
      NAME/VERSION/metadata.json          the passport, uploaded after the files it describes

Why a concurrent writer's change cannot be lost: every index write is a PUT with If-Match set to
the ETag of the index the change was decided on. If anyone wrote the index since, the ETag
differs and the PUT fails (412, IndexMoved); the store reads the new index, decides again on it (a
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

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loraserve.registry.diskcache import DiskCache
from loraserve.registry.errors import MOVES, IndexInvalid, IndexMoved, StoreError
from loraserve.registry.passport import PASSPORT_FILE, Passport
from loraserve.registry.prepare import CONFIG, WEIGHTS
from loraserve.registry.reconcile import reconcile
from loraserve.registry.s3 import S3, Conflict, NotFound, OriginError
from loraserve.registry.snapshot import INDEX, Snapshot, index_text, parse_index

log = logging.getLogger(__name__)

CLAIM = ".claim"


@dataclass(frozen=True)
class Fetched:
    """A version brought from the bucket into the disk cache: bytes and seconds (0 on a cache hit)."""

    bytes: int
    seconds: float

    @property
    def downloaded(self) -> bool:
        return self.bytes > 0


class S3Backend:
    def __init__(self, s3: S3, cache_dir: Path):
        self.s3 = s3
        self.cache_dir = Path(cache_dir)
        """Where served copies live (a DiskCache's root): version_dir points there."""

    @property
    def url(self) -> str:
        return self.s3.location.url

    @property
    def index_name(self) -> str:
        return f"{self.url}/{INDEX}"

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
        return parse_index(raw, self.index_name), etag

    def index_stamp(self) -> str:
        """The index's ETag ('' when there is none): one HEAD."""
        return self.s3.etag(self.s3.key(INDEX)) or ""

    # -- writing -----------------------------------------------------------------
    @contextmanager
    def deciding(self) -> Iterator[tuple[Snapshot, str | None]]:
        """The index and its ETag, which the write of a change decided on it must still find."""
        yield self.read_index()

    def commit(self, passports: list[Passport], changed: list[Passport], etag: str | None) -> None:
        try:
            self._write_index(passports, etag)
        except Conflict as exc:
            raise IndexMoved(str(exc)) from exc
        self._mirror(changed)

    def _write_index(self, passports: list[Passport], etag: str | None) -> None:
        self.s3.put(self.s3.key(INDEX), index_text(passports).encode(), if_match=etag, if_none_match=etag is None)

    def _mirror(self, passports: list[Passport]) -> None:
        for p in passports:
            self.s3.put(self.s3.key(p.name, p.version, PASSPORT_FILE), _passport_bytes(p))

    # -- registering -------------------------------------------------------------
    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A local temporary directory: the registration is prepared and smoke-tested there."""
        with tempfile.TemporaryDirectory(prefix="loraserve-register-") as stage:
            yield Path(stage)

    def _indexed(self, draft: Passport) -> bool:
        """Whether the index names `draft` now; True when it cannot be read (keeping files the
        index may name is the safe side: a reindex settles it)."""
        try:
            return self.read_index()[0].get(draft.name, draft.version) is not None
        except OriginError:
            return True

    def _claimed(self, name: str) -> list[int]:
        """Version numbers with any object under them (claimed, even by a writer that died)."""
        under = self.s3.key(name) + "/"
        return [int(v) for v in {k[len(under):].split("/", 1)[0] for k in self.s3.keys(under)} if v.isdigit()]

    def claim(self, name: str, snap: Snapshot) -> str:
        """The first number past every claimed or indexed one whose claim object this writer
        creates (If-None-Match: *): whoever creates it owns the number."""
        version = max([*self._claimed(name), *(int(p.version) for p in snap.versions(name))], default=0) + 1
        for _ in range(MOVES):
            try:
                self.s3.put(self.s3.key(name, str(version), CLAIM), b"", if_none_match=True)
                return str(version)
            except Conflict:
                version += 1  # another registration took it first
        raise StoreError(f"could not claim a version of {name}; retry")

    @contextmanager
    def published(self, stage: Path, draft: Passport) -> Iterator[None]:
        """The files uploaded, then the passport. If the index write that follows fails, they are
        deleted again (so a reindex never adopts a refused version) unless the write may have
        landed: an error other than a lost race, and the index names the version."""
        keys = [self.s3.key(draft.name, draft.version, f) for f in (CONFIG, WEIGHTS, PASSPORT_FILE)]
        self.s3.upload(keys[0], stage / CONFIG)
        self.s3.upload(keys[1], stage / WEIGHTS)
        self.s3.put(keys[2], _passport_bytes(draft))
        try:
            yield
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
        for _ in range(MOVES):
            try:
                raw, etag = self.s3.get(self.s3.key(INDEX))
                indexed = {p.key: p.to_dict() for p in parse_index(raw, self.index_name).passports}
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
        raise StoreError(f"{self.index_name} kept changing under {MOVES} tries; retry")

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
