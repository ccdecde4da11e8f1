"""Typed errors raised inside the service; server/errors.py maps each to a gRPC status.

`reason` becomes google.rpc.ErrorInfo.reason, `metadata` its metadata.
"""

from __future__ import annotations


class LoraServeError(Exception):
    reason = "INTERNAL"

    def __init__(self, message: str, **metadata: str):
        super().__init__(message)
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(LoraServeError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field=field)
        self.field = field


class AdapterNotFound(LoraServeError):
    reason = "ADAPTER_NOT_FOUND"

    def __init__(self, adapter_id: str):
        super().__init__(f"adapter {adapter_id!r} is not served here", adapter_id=adapter_id)


class AdapterLoadFailed(LoraServeError):
    reason = "ADAPTER_LOAD_FAILED"

    def __init__(self, adapter_id: str, cause: str):
        super().__init__(f"adapter {adapter_id!r} failed to load: {cause}", adapter_id=adapter_id)
        self.adapter_id, self.cause = adapter_id, cause


class OriginFetchFailed(AdapterLoadFailed):
    """The adapter's files could not be fetched from the remote origin (after retries); the
    origin's own error is in the metadata."""

    def __init__(self, adapter_id: str, origin: str, origin_error: str, origin_code: str):
        super().__init__(adapter_id, f"fetching it from {origin} failed: {origin_error}")
        self.metadata.update(origin=origin, origin_error=origin_error, origin_code=origin_code)


class AdapterIncompatible(LoraServeError):
    """The adapter does not fit the served base model (or its files are not what was registered)."""

    reason = "ADAPTER_INCOMPATIBLE"

    def __init__(self, adapter_id: str, why: str, reason: str | None = None):
        super().__init__(f"adapter {adapter_id!r} cannot be used with this server: {why}", adapter_id=adapter_id)
        if reason:
            self.reason = reason


class AdapterNotActive(LoraServeError):
    """Known, but no version may serve now (none active, or the one named is archived/failed)."""

    reason = "ADAPTER_NOT_ACTIVE"

    def __init__(self, adapter_id: str, why: str):
        super().__init__(f"adapter {adapter_id!r} is not in service: {why}", adapter_id=adapter_id)


class AdapterAmbiguous(LoraServeError):
    """The id names more than one adapter in the store; it is refused rather than guessed."""

    reason = "ADAPTER_AMBIGUOUS"

    def __init__(self, adapter_id: str, why: str):
        super().__init__(f"adapter id {adapter_id!r} is ambiguous: {why}", adapter_id=adapter_id)


class NoChatTemplate(LoraServeError):
    """Chat messages sent to a base model whose tokenizer has no chat template to render them."""

    reason = "NO_CHAT_TEMPLATE"

    def __init__(self, model: str):
        super().__init__(f"base model {model!r} has no chat template; send a prompt (or prompt_token_ids) "
                         "instead of messages", model=model)


class Unauthenticated(LoraServeError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(LoraServeError):
    reason = "PERMISSION_DENIED"


class AdapterBusy(LoraServeError):
    """An admin action refused because the adapter is pinned or in use."""

    reason = "ADAPTER_BUSY"

    def __init__(self, adapter_id: str, why: str):
        super().__init__(f"adapter {adapter_id!r} cannot be evicted: {why}", adapter_id=adapter_id)


class NoCacheRoom(LoraServeError):
    reason = "CACHE_FULL"


class Overloaded(LoraServeError):
    """Refused for load, not for what was asked: the caller should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float, **metadata: str):
        super().__init__(message, **metadata)
        self.retry_after_s = retry_after_s


class QueueFull(Overloaded):
    reason = "QUEUE_FULL"

    def __init__(self, depth: int, retry_after_s: float):
        super().__init__(f"request queue is full ({depth} waiting); retry later", retry_after_s,
                         queue_depth=str(depth))


class TooManyStreams(Overloaded):
    reason = "CLIENT_STREAM_LIMIT"

    def __init__(self, client: str, limit: int):
        super().__init__(f"client {client!r} already has {limit} requests in flight; retry when one ends",
                         retry_after_s=0.5, client=client, limit=str(limit))


class OutOfMemory(LoraServeError):
    """A batch did not fit in memory even alone; the request is too large for this server now."""

    reason = "OUT_OF_MEMORY"


class GenerationFailed(LoraServeError):
    """This request's own step failed when run alone (its data made the model or sampling fail,
    or its scores were not finite); the rows beside it were retried without it and go on."""

    reason = "GENERATION_FAILED"

    def __init__(self, message: str, reason: str | None = None, **metadata: str):
        super().__init__(message, **metadata)
        if reason:
            self.reason = reason


class DeadlineTooShort(LoraServeError):
    """Refused at once: the expected wait alone exceeds the time the caller has left."""

    reason = "EXPECTED_WAIT_EXCEEDS_DEADLINE"

    def __init__(self, expected_s: float, remaining_s: float):
        super().__init__(f"the expected wait ({expected_s:.2f}s) exceeds the deadline's remaining "
                         f"{remaining_s:.2f}s", expected_wait_ms=str(round(expected_s * 1e3)))


class NotReady(LoraServeError):
    reason = "NOT_READY"


class ShuttingDown(LoraServeError):
    reason = "SHUTTING_DOWN"


class Shed(LoraServeError):
    """A shadow request gave way to real traffic (never seen by a client)."""

    reason = "SHADOW_SHED"
