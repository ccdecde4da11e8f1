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


class QueueFull(LoraServeError):
    reason = "QUEUE_FULL"

    def __init__(self, depth: int, retry_after_s: float):
        super().__init__(f"request queue is full ({depth} waiting); retry later", queue_depth=str(depth))
        self.retry_after_s = retry_after_s


class NotReady(LoraServeError):
    reason = "NOT_READY"


class ShuttingDown(LoraServeError):
    reason = "SHUTTING_DOWN"
