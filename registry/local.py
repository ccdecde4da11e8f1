"""The local backend: the store in a directory, its index replaced atomically under a file lock.

    ROOT/
      registry.json            THE source of truth for which versions exist and their status
      .lock                    flock held by every writer (CLI, recovery), one at a time
      .staging/                registrations being prepared (removed when their writer died)
      NAME/
        VERSION/               1, 2, 3 ... one self-contained directory per version
          adapter_config.json
          adapter_model.safetensors
          metadata.json        the passport (registry.passport): facts about this version

Every write of registry.json is one os.replace, so it changes all the versions a transition
changes in one step. A writer decides on the index while holding the lock and writes it before
letting go, so no change can be lost and none ever needs deciding again.

A registration is prepared under .staging/ (copied, checked, smoke-tested, fsynced) and renamed
into NAME/VERSION complete, then added to the index; a version directory therefore never appears
half-written. A crash between the rename and the index write leaves a complete version that
recovery adopts with the status its passport records (staging or failed).

Recovery (`recover`, run by every writer first, by `reindex`, when the CLI opens the store and at
server start) removes staging leftovers and version directories without a passport, then
reconciles the index with the passports (registry.reconcile) and logs every decision. Deleting
registry.json loses only what passports have not yet mirrored. An index that does not validate is
no crash's doing, since every write of it is atomic: recovery refuses it and only `reindex`
rebuilds it from the passports, so nobody (server or writer) decides anything from a damaged index.

Every path read resolves inside the root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from loraserve.contract import NAME
from loraserve.registry.durable import flocked, fsync_dir, write_atomic
from loraserve.registry.errors import IndexInvalid, StoreError
from loraserve.registry.passport import PASSPORT_FILE, Passport
from loraserve.registry.prepare import CONFIG, PICKLE_WEIGHTS, WEIGHTS
from loraserve.registry.reconcile import reconcile
from loraserve.registry.snapshot import INDEX, Snapshot, index_text, parse_index

log = logging.getLogger(__name__)

LOCK = ".lock"
STAGING = ".staging"
RACY_S = 2.0
"""Timestamps can be this coarse (FAT 2 s; ext3, HFS+ and some network filesystems 1 s): a rewrite
of the same size within one tick keeps inode, size, mtime and ctime. While the index is younger
than this its stamp also hashes its bytes (git's "racily clean" rule)."""


def file_stamp(st: os.stat_result, content: Callable[[], bytes]) -> tuple:
    """inode, size, mtime and ctime (os.utime cannot set ctime), and the bytes' hash while racy."""
    racy = time.time() - max(st.st_mtime, st.st_ctime) < RACY_S
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            hashlib.sha256(content()).hexdigest() if racy else "")


class LocalBackend:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def index_name(self) -> str:
        return str(self.root / INDEX)

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
    def deciding(self) -> Iterator[tuple[Snapshot, None]]:
        """The store lock for the block, and the recovered state to decide on (the lock makes any
        write under it a safe one: no token needed)."""
        with self._locked(rebuild=False) as snap:
            yield snap, None

    @contextmanager
    def _locked(self, rebuild: bool) -> Iterator[Snapshot]:
        self.root.mkdir(parents=True, exist_ok=True)
        with flocked(self.root / LOCK):
            yield self._recover(rebuild)

    def commit(self, passports: list[Passport], changed: list[Passport], token: None) -> None:
        self._commit(passports, changed)

    def recover(self) -> Snapshot:
        with self._locked(rebuild=False) as snap:
            return snap

    def reindex(self) -> Snapshot:
        """Rebuild registry.json from the passports (after editing the store by hand, or when the
        index does not validate); lifecycle fields stay as a valid index has them (use
        promote/rollback/archive to change those)."""
        with self._locked(rebuild=True) as snap:
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
        return self._commit(passports, stale, force=indexed is None)

    def _commit(self, passports: list[Passport], mirror: list[Passport], force: bool = True) -> Snapshot:
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
        for p in mirror:
            p.write(self.version_dir(p.name, p.version))
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

    # -- registering -------------------------------------------------------------
    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A private directory under .staging/, shared-locked so recovery leaves it alone."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / STAGING).mkdir(exist_ok=True)
        with flocked(self.root / (STAGING + ".lock"), shared=True):
            stage = self.root / STAGING / uuid.uuid4().hex
            stage.mkdir()
            try:
                yield stage
            finally:
                shutil.rmtree(stage, ignore_errors=True)

    def claim(self, name: str, snap: Snapshot) -> str:
        """The next number after every directory and index entry of `name` (the lock, held until
        the version's directory is in place, keeps it ours)."""
        name_dir = self.root / name
        on_disk = [int(d.name) for d in name_dir.iterdir() if d.name.isdigit()] if name_dir.is_dir() else []
        return str(max([*on_disk, *(int(p.version) for p in snap.versions(name))], default=0) + 1)

    @contextmanager
    def published(self, stage: Path, draft: Passport) -> Iterator[None]:
        """The passport written last into the stage, which is renamed into NAME/VERSION complete; a
        failed index write leaves it there for recovery to adopt."""
        draft.write(stage)
        fsync_dir(stage)
        name_dir = self.root / draft.name
        name_dir.mkdir(exist_ok=True)
        fsync_dir(self.root)
        stage.rename(self.version_dir(draft.name, draft.version))
        fsync_dir(name_dir)
        yield
