"""The local disk tier in front of a remote origin: verified copies of adapter versions under a
byte budget, least recently used evicted first, never one a load is reading.

    ROOT/
      .lock                  flock held by the one server using this cache
      .tmp/UUID/             a download in progress (removed at start: never served)
      NAME/VERSION/          a complete, verified copy: what AdapterRef.path names
        adapter_config.json  adapter_model.safetensors
        .complete.json       {"sha256", "bytes"}: written last, so a directory without it is a leftover

A copy is built under .tmp/ and renamed into place only after its weights hashed to the
passport's sha256, so a partial or corrupt download is never at a path a load reads. A lease
(taken on a hit or by the download itself, given back once the RAM tier holds the tensors)
keeps its copy from eviction; a download that needs room waits for leases to end.
Thread-safe: downloads run on threads.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loraserve.contract import NAME
from loraserve.registry.errors import StoreError

log = logging.getLogger(__name__)

TMP = ".tmp"
MANIFEST = ".complete.json"


class DiskCacheFull(StoreError):
    """No room: the copy alone exceeds the budget, or loads kept holding the rest too long."""


@dataclass
class _Entry:
    sha256: str
    bytes: int
    last_used: float
    leases: int = 0


@dataclass
class DiskCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    discarded: int = 0
    """Downloads thrown away unfinished or unverified."""


class DiskCache:
    def __init__(self, root: Path, budget_bytes: int):
        self.root = Path(root)
        self.budget = budget_bytes
        self.stats = DiskCacheStats()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._reserved = 0
        self._cond = threading.Condition()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreError(f"disk cache {self.root} is in use by another server; give each its own "
                             "--disk-cache-dir") from None
        shutil.rmtree(self.root / TMP, ignore_errors=True)
        (self.root / TMP).mkdir()
        self._scan()
        with self._cond:
            self._evict_for(0)

    def close(self) -> None:
        os.close(self._lock_fd)

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    @property
    def used(self) -> int:
        """Bytes on disk plus bytes reserved for downloads under way (the scrape thread reads it too)."""
        with self._cond:
            return sum(e.bytes for e in self._entries.values()) + self._reserved

    def __len__(self) -> int:
        return len(self._entries)

    def _scan(self) -> None:
        """Adopt complete copies left by an earlier run; remove anything else."""
        for name_dir in self.root.iterdir():
            if name_dir.name in (TMP, ".lock"):
                continue
            if not (NAME.fullmatch(name_dir.name) and name_dir.is_dir() and not name_dir.is_symlink()):
                log.warning("removing %s from the disk cache: not a cached adapter", name_dir)
                _remove(name_dir)
                continue
            for vdir in name_dir.iterdir():
                try:
                    manifest = json.loads((vdir / MANIFEST).read_text())
                    entry = _Entry(str(manifest["sha256"]), int(manifest["bytes"]),
                                   (vdir / MANIFEST).stat().st_mtime)
                    if not vdir.name.isdigit() or vdir.is_symlink():
                        raise ValueError("not a version directory")
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("removing %s from the disk cache: incomplete (%s)", vdir, exc)
                    _remove(vdir)
                    continue
                self._entries[(name_dir.name, vdir.name)] = entry

    # -- leases ----------------------------------------------------------------
    def lease(self, name: str, version: str, sha256: str) -> bool:
        """Take a lease on a verified copy of these weights; False (a miss) if there is none. A
        copy of other weights under the same name (the bucket was rebuilt) is dropped."""
        with self._cond:
            entry = self._entries.get((name, version))
            if entry is not None and entry.sha256 != sha256 and entry.leases == 0:
                log.warning("disk cache copy of %s@%s has other weights than the passport; dropping it", name,
                            version)
                self._drop((name, version))
                entry = None
            if entry is None or entry.sha256 != sha256:
                self.stats.misses += 1
                return False
            entry.leases += 1
            entry.last_used = time.time()
            self.stats.hits += 1
        _touch(self.path(name, version) / MANIFEST)
        return True

    def release(self, name: str, version: str) -> None:
        with self._cond:
            entry = self._entries.get((name, version))
            if entry is not None and entry.leases > 0:
                entry.leases -= 1
                self._cond.notify_all()

    # -- filling -----------------------------------------------------------------
    @contextmanager
    def filling(self, name: str, version: str, sha256: str, nbytes: int, wait_s: float) -> Iterator[Path]:
        """A private directory to download `nbytes` into, room reserved (evicting or waiting up to
        `wait_s` for leases to end). When the block ends normally the directory becomes the
        copy, leased to the caller; if it raises, everything written is discarded."""
        with self._cond:
            if nbytes > self.budget:
                raise DiskCacheFull(f"{name}@{version} needs {nbytes} bytes; the whole disk cache budget "
                                    f"(--disk-cache-mib) is {self.budget}")
            deadline = time.monotonic() + wait_s
            while not self._evict_for(nbytes):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DiskCacheFull(f"no room for {name}@{version} ({nbytes} bytes) in the disk cache: "
                                        f"{self.used} of {self.budget} bytes are held by loads in progress")
                self._cond.wait(left)
            self._reserved += nbytes
        tmp = self.root / TMP / uuid.uuid4().hex
        tmp.mkdir()
        try:
            yield tmp
            (tmp / MANIFEST).write_text(json.dumps({"sha256": sha256, "bytes": nbytes}))
            target = self.path(name, version)
            target.parent.mkdir(exist_ok=True)
            with self._cond:
                if (name, version) in self._entries:
                    self._drop((name, version))
                _remove(target)
                tmp.rename(target)
                self._entries[(name, version)] = _Entry(sha256, nbytes, time.time(), leases=1)
        except BaseException:
            with self._cond:
                self.stats.discarded += 1
            raise
        finally:
            with self._cond:
                self._reserved -= nbytes
                self._cond.notify_all()
            _remove(tmp)

    def _evict_for(self, nbytes: int) -> bool:
        """Evict unleased copies, least recently used first, until `nbytes` more fit; whether they do."""
        victims = sorted((e.last_used, key) for key, e in self._entries.items() if e.leases == 0)
        while self.used + nbytes > self.budget and victims:
            _, key = victims.pop(0)
            self._drop(key)
            self.stats.evictions += 1
        return self.used + nbytes <= self.budget

    def _drop(self, key: tuple[str, str]) -> None:
        del self._entries[key]
        _remove(self.path(*key))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # recency survives a restart: the scan reads it back
    except OSError:
        pass
