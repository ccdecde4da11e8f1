"""Where a store lives: a local directory, or an S3-compatible bucket (`s3://BUCKET/PREFIX`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from registry.store import Store

SCHEME = "s3://"


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """Key prefix without a trailing slash ('' = the bucket's root)."""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not is_remote(url):
            raise ValueError(f"{url!r} is not an s3://BUCKET[/PREFIX] address")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def open_store(location: str | Path, *, endpoint_url: str | None = None, cache_dir: Path = Path("var/adapter-cache"),
               timeout_s: float = 30.0, retries: int = 3, on_retry: Callable | None = None):
    """The store at `location`: a Store (not yet recovered), or an S3Store whose served copies
    go under `cache_dir`, in a directory of their own per bucket, prefix and endpoint."""
    if not is_remote(location):
        return Store(Path(location))
    from registry.s3 import S3, Retry  # boto3 only for a bucket
    from registry.s3store import S3Store

    s3 = S3(str(location), endpoint_url=endpoint_url, timeout_s=timeout_s, retry=Retry(attempts=retries + 1),
            on_retry=on_retry)
    origin = hashlib.sha256(f"{s3.location.url}|{endpoint_url or ''}".encode()).hexdigest()[:12]
    return S3Store(s3, Path(cache_dir) / f"{s3.location.bucket}-{origin}")
