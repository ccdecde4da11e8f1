"""Opening the store at a location: a Store over a local directory, or over an S3 bucket."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from loraserve.registry.location import is_remote
from loraserve.registry.store import Store


def open_store(location: str | Path, *, endpoint_url: str | None = None, cache_dir: Path = Path("var/adapter-cache"),
               timeout_s: float = 30.0, retries: int = 3, on_retry: Callable | None = None) -> Store:
    """The store at `location`: a local one (not yet recovered), or a bucket's whose served copies
    go under `cache_dir`, in a directory of their own per bucket, prefix and endpoint."""
    if not is_remote(location):
        return Store.local(Path(location))
    from loraserve.registry.s3 import S3, Retry  # boto3 only for a bucket
    from loraserve.registry.s3backend import S3Backend

    s3 = S3(str(location), endpoint_url=endpoint_url, timeout_s=timeout_s, retry=Retry(attempts=retries + 1),
            on_retry=on_retry)
    origin = hashlib.sha256(f"{s3.location.url}|{endpoint_url or ''}".encode()).hexdigest()[:12]
    return Store(S3Backend(s3, Path(cache_dir) / f"{s3.location.bucket}-{origin}"))
