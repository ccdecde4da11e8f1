"""A store's address: a local directory, or an S3-compatible bucket (`s3://BUCKET/PREFIX`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCHEME = "s3://"
DEFAULT_STORE = "var/demo/adapters"
DEFAULT_MODEL = Path("var/demo/base")
"""Where `make serve` builds the demo: the defaults of `loraserve serve` and `loraserve adapters`."""


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
