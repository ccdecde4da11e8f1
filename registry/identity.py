"""Fingerprints: which base model is this, exactly, and are these the weights we registered."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class BaseIdentity:
    model_id: str
    revision: str


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "loraserve" / "revisions.json"


def base_identity(model_path: Path) -> BaseIdentity:
    """Id from config.json, revision = sha256 over config.json and every weights file.

    Hashing a large model takes a while, so the result is cached per directory,
    keyed by the files' sizes and modification times.
    """
    model_path = Path(model_path).resolve()
    config = json.loads((model_path / "config.json").read_text())
    model_id = config.get("_name_or_path") or model_path.name
    files = sorted([model_path / "config.json", *model_path.glob("*.safetensors"), *model_path.glob("*.bin")])
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(model_path))
    if hit and hit["stamp"] == stamp:
        return BaseIdentity(model_id, hit["revision"])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    revision = h.hexdigest()
    cache[str(model_path)] = {"stamp": stamp, "revision": revision}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache))
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return BaseIdentity(model_id, revision)
