"""S3-compatible object storage for the registry: location parsing, errors people can act on,
conditional writes, and downloads that are timed, retried and hashed as they stream.

boto3 (botocore) is synchronous; callers on an event loop run these calls on a thread. Its
own retries are off: `with_retries` retries what may pass (timeouts, refused connections,
5xx, throttling) with exponential backoff and full jitter, and never what will not (a missing
object, denied credentials, a failed precondition).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from registry.location import S3Location
from registry.store import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
_CHUNK = 1 << 20
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_RETRYABLE = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
              "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}


class OriginError(StoreError):
    """An object-storage call failed. `code` is the service's error code (NoSuchKey, AccessDenied,
    InvalidAccessKeyId, ...) or the transport failure's name (ReadTimeoutError, ...)."""

    def __init__(self, message: str, code: str, retryable: bool):
        super().__init__(message)
        self.code, self.retryable = code, retryable


class NotFound(OriginError):
    def __init__(self, message: str, code: str = "NoSuchKey"):
        super().__init__(message, code, retryable=False)


class Conflict(OriginError):
    """A conditional write lost: the object changed (If-Match) or exists (If-None-Match) already."""

    def __init__(self, message: str):
        super().__init__(message, "PreconditionFailed", retryable=False)


class HashMismatch(OriginError):
    """A download's bytes are not what the passport recorded (the object is not what was registered)."""

    def __init__(self, message: str):
        super().__init__(message, "WeightsHashMismatch", retryable=False)


def _classify(exc: Exception, what: str) -> OriginError:
    if isinstance(exc, OriginError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        message = f"{what}: {code}: {err.get('Message') or exc}"
        if code in _NOT_FOUND:
            return NotFound(message, code)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return Conflict(message)
        return OriginError(message, code, retryable=code in _RETRYABLE)
    if isinstance(exc, (BotoCoreError, OSError, TimeoutError)):
        # Connection refused or reset, timeouts, a body that ended early: the network, worth a retry.
        return OriginError(f"{what}: {type(exc).__name__}: {exc}", type(exc).__name__, retryable=True)
    raise exc


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    """Tries in all (1 = no retry)."""
    base_s: float = 0.2
    cap_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)], so retrying replicas spread out."""
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** attempt))


class S3:
    """One bucket and prefix; every method raises OriginError (or a subclass)."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, timeout_s: float = 30.0,
                 retry: Retry = Retry(), on_retry: Callable[[OriginError], None] | None = None):
        self.location = S3Location.parse(url)
        self.timeout_s = timeout_s
        self.retry = retry
        self.on_retry = on_retry
        # Credentials, region and (without --s3-endpoint-url) AWS_ENDPOINT_URL come from the
        # standard AWS variables and files (~/.aws/credentials, ~/.aws/config, AWS_PROFILE).
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None,
            config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1},
                          s3={"addressing_style": "path"} if endpoint_url else None))

    def key(self, *parts: str) -> str:
        return self.location.key(*parts)

    def with_retries(self, what: str, call: Callable[[], T]) -> T:
        for attempt in range(self.retry.attempts):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - classified: anything else is re-raised
                err = _classify(exc, what)
                if not err.retryable or attempt + 1 == self.retry.attempts:
                    raise err from exc
                pause = self.retry.delay(attempt)
                log.warning("%s (attempt %d of %d); retrying in %.2fs", err, attempt + 1, self.retry.attempts,
                            pause)
                if self.on_retry is not None:
                    self.on_retry(err)
                time.sleep(pause)
        raise AssertionError("unreachable")

    # -- small objects ---------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and ETag, from one GET (so they agree)."""
        def call():
            r = self.client.get_object(Bucket=self.location.bucket, Key=key)
            return r["Body"].read(), r["ETag"]
        return self.with_retries(f"GET {key}", call)

    def etag(self, key: str) -> str | None:
        try:
            return self.with_retries(f"HEAD {key}", lambda: self.client.head_object(
                Bucket=self.location.bucket, Key=key)["ETag"])
        except NotFound:
            return None

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write `data`; returns the new ETag. Conditional writes raise Conflict when they lose,
        and are not retried on a transport error (the write may have landed: the caller re-reads)."""
        kwargs = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_none_match else {}
        call = lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data, **kwargs)["ETag"]  # noqa: E731
        if kwargs:
            try:
                return call()
            except Exception as exc:  # noqa: BLE001
                err = _classify(exc, f"PUT {key}")
                if isinstance(err, NotFound) and if_match:
                    raise Conflict(f"PUT {key}: it was deleted meanwhile") from exc
                raise err from exc
        return self.with_retries(f"PUT {key}", call)

    def upload(self, key: str, path: Path) -> None:
        """A file of any size (multipart above 64 MiB, parts retried by the transfer manager)."""
        self.with_retries(f"PUT {key}", lambda: self.client.upload_file(
            str(path), self.location.bucket, key, Config=TransferConfig(multipart_threshold=64 << 20)))

    def delete(self, key: str) -> None:
        self.with_retries(f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key))

    def keys(self, under: str) -> Iterator[str]:
        """Every key below `under` (a key prefix)."""
        def page(token: str | None):
            kwargs = {"ContinuationToken": token} if token else {}
            return self.client.list_objects_v2(Bucket=self.location.bucket, Prefix=under, **kwargs)
        token = None
        while True:
            r = self.with_retries(f"LIST {under}", lambda: page(token))
            yield from (o["Key"] for o in r.get("Contents", ()))
            if not r.get("IsTruncated"):
                return
            token = r["NextContinuationToken"]

    # -- large objects ---------------------------------------------------------
    def download(self, key: str, dest: Path, sha256: str = "") -> int:
        """Stream the object into `dest`, hashing as it arrives; each try must finish within
        timeout_s. Returns its bytes. A short body, a stall or a sha256 other than `sha256`
        (when given) raises, and `dest` then holds nothing anyone may use."""
        return self.with_retries(f"GET {key}", lambda: self._download_once(key, dest, sha256))

    def _download_once(self, key: str, dest: Path, sha256: str) -> int:
        deadline = time.monotonic() + self.timeout_s
        r = self.client.get_object(Bucket=self.location.bucket, Key=key)
        expected = r["ContentLength"]
        digest, got = hashlib.sha256(), 0
        body = r["Body"]
        try:
            with open(dest, "wb") as f:
                # Each read waits at most read_timeout; the deadline bounds a trickle of small reads.
                while chunk := body.read(_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
                    got += len(chunk)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{got} of {expected} bytes after {self.timeout_s:g}s")
        finally:
            body.close()
        if got != expected:
            raise OriginError(f"GET {key}: {got} of {expected} bytes arrived", "IncompleteBody", retryable=True)
        if sha256 and digest.hexdigest() != sha256:
            raise HashMismatch(f"GET {key}: sha256 {digest.hexdigest()[:12]}... is not the passport's "
                               f"{sha256[:12]}...")
        return got
