"""S3-compatible object storage for the registry: location parsing, errors people can act on,
conditional writes, and downloads that are timed, retried and hashed as they stream.

boto3 (botocore) is synchronous; callers on an event loop run these calls on a thread. Idempotent
calls (GET, HEAD, LIST, DELETE, an unconditional PUT) are retried by botocore's `standard` mode:
what may pass (timeouts, refused connections, 5xx, throttling) with exponential backoff, jitter
and a retry quota; never what will not (a missing object, denied credentials). Two kinds of call
go through a client with botocore's retries off instead:
- a conditional write (If-Match / If-None-Match): retried after a lost response, a write that had
  landed would answer 412 and read as a lost race; it fails instead and its caller re-reads;
- a download: botocore retries a GET only until its headers arrive, while a stall, a short body
  or a wrong hash come later, as the body streams; `_download` retries the whole GET itself.
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

from loraserve.registry.location import S3Location
from loraserve.registry.errors import StoreError

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
    """Tries in all (1 = no retry): botocore's total_max_attempts, and a download's tries."""
    base_s: float = 0.2
    cap_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """A download's pause before its next try. Full jitter: uniform in
        [0, min(cap, base * 2**attempt)], so retrying replicas spread out."""
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** attempt))


class S3:
    """One bucket and prefix; every method raises OriginError (or a subclass)."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, timeout_s: float = 30.0,
                 retry: Retry = Retry(), on_retry: Callable[[OriginError], None] | None = None):
        self.location = S3Location.parse(url)
        self.timeout_s = timeout_s
        self.retry = retry
        self.on_retry = on_retry

        def client(attempts: int):
            # Credentials, region and (without --s3-endpoint-url) AWS_ENDPOINT_URL come from the
            # standard AWS variables and files (~/.aws/credentials, ~/.aws/config, AWS_PROFILE).
            return boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url or None,
                config=Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                              retries={"mode": "standard", "total_max_attempts": attempts},
                              s3={"addressing_style": "path"} if endpoint_url else None))
        self.client = client(retry.attempts)
        self._once = client(1)
        events = self.client.meta.events
        events.register("needs-retry.s3", self._note_failure)
        events.register("request-created.s3", self._count_retry)

    def key(self, *parts: str) -> str:
        return self.location.key(*parts)

    # -- botocore's retries, counted ------------------------------------------------
    @staticmethod
    def _note_failure(request_dict, response, caught_exception, operation, **_):
        """Each try's outcome, kept in the call's context for `_count_retry` (a retry re-creates
        the request: only then is it known that botocore chose to retry)."""
        if isinstance(caught_exception, (BotoCoreError, OSError)):
            failure = caught_exception
        elif caught_exception is None and response is not None and response[0].status_code >= 300:
            failure = ClientError(response[1], operation.name)
        else:
            return
        request_dict["context"]["loraserve_failure"] = _classify(failure, operation.name)

    def _count_retry(self, request, **_):
        tries = request.context.get("retries", {})
        if tries.get("attempt", 1) > 1 and (err := request.context.get("loraserve_failure")) is not None:
            log.warning("%s (attempt %d of %d); retrying", err, tries["attempt"] - 1, self.retry.attempts)
            if self.on_retry is not None:
                self.on_retry(err)

    def call(self, what: str, call: Callable[[], T]) -> T:
        """One botocore call (retried by botocore), its failure classified."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified: anything else is re-raised
            raise _classify(exc, what) from exc

    # -- small objects ---------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and ETag, from one GET (so they agree)."""
        def call():
            r = self.client.get_object(Bucket=self.location.bucket, Key=key)
            return r["Body"].read(), r["ETag"]
        return self.call(f"GET {key}", call)

    def head(self, key: str) -> dict:
        return self.call(f"HEAD {key}", lambda: self.client.head_object(Bucket=self.location.bucket, Key=key))

    def etag(self, key: str) -> str | None:
        try:
            return self.head(key)["ETag"]
        except NotFound:
            return None

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write `data`; returns the new ETag. Conditional writes raise Conflict when they lose,
        and are not retried (the write may have landed: the caller re-reads)."""
        kwargs = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_none_match else {}
        if not kwargs:
            return self.call(f"PUT {key}", lambda: self.client.put_object(
                Bucket=self.location.bucket, Key=key, Body=data)["ETag"])
        try:
            return self._once.put_object(Bucket=self.location.bucket, Key=key, Body=data, **kwargs)["ETag"]
        except Exception as exc:  # noqa: BLE001
            err = _classify(exc, f"PUT {key}")
            if isinstance(err, NotFound) and if_match:
                raise Conflict(f"PUT {key}: it was deleted meanwhile") from exc
            raise err from exc

    def upload(self, key: str, path: Path) -> None:
        """A file of any size (multipart above 64 MiB, each part retried by botocore)."""
        self.call(f"PUT {key}", lambda: self.client.upload_file(
            str(path), self.location.bucket, key, Config=TransferConfig(multipart_threshold=64 << 20)))

    def delete(self, key: str) -> None:
        self.call(f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key))

    def keys(self, under: str) -> Iterator[str]:
        """Every key below `under` (a key prefix)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=under)
        try:
            for page in pages:
                yield from (o["Key"] for o in page.get("Contents", ()))
        except (ClientError, BotoCoreError) as exc:
            raise _classify(exc, f"LIST {under}") from exc

    # -- large objects ---------------------------------------------------------
    def download(self, key: str, dest: Path, sha256: str = "") -> int:
        """Stream the object into `dest`, hashing as it arrives; each try must finish within
        timeout_s. Returns its bytes. A short body, a stall or a sha256 other than `sha256`
        (when given) raises, and `dest` then holds nothing anyone may use."""
        what = f"GET {key}"
        for attempt in range(self.retry.attempts):
            try:
                return self._download_once(key, dest, sha256)
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

    def _download_once(self, key: str, dest: Path, sha256: str) -> int:
        deadline = time.monotonic() + self.timeout_s
        r = self._once.get_object(Bucket=self.location.bucket, Key=key)
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
