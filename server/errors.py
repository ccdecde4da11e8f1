"""The one place where service errors become gRPC statuses (with google.rpc details)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import AsyncIterator, NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from loraserve.scheduler import errors as e

log = logging.getLogger(__name__)

DOMAIN = "loraserve.v1"

_CODES: dict[type[e.LoraServeError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    e.AdapterLoadFailed: grpc.StatusCode.UNAVAILABLE,
    e.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.OutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.DeadlineTooShort: grpc.StatusCode.DEADLINE_EXCEEDED,
    e.NoCacheRoom: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.AdapterBusy: grpc.StatusCode.FAILED_PRECONDITION,
    e.AdapterIncompatible: grpc.StatusCode.FAILED_PRECONDITION,
    e.AdapterNotActive: grpc.StatusCode.FAILED_PRECONDITION,
    e.AdapterAmbiguous: grpc.StatusCode.FAILED_PRECONDITION,
    e.NoChatTemplate: grpc.StatusCode.FAILED_PRECONDITION,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.NotReady: grpc.StatusCode.UNAVAILABLE,
    e.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


def status_code(exc: e.LoraServeError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def rich_status(exc: e.LoraServeError) -> status_pb2.Status:
    code = status_code(exc)
    status = status_pb2.Status(code=code.value[0], message=exc.message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata))
    if isinstance(exc, e.InvalidArgument):
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)]))
    if isinstance(exc, e.Overloaded):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(exc.retry_after_s * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


@contextlib.asynccontextmanager
async def call_over() -> AsyncIterator[None]:
    """Around anything sent on a call. gRPC raises InternalError (ExecuteBatchError) when a message
    or status is sent on a call that is already over: its caller cancelled or went away, or its
    deadline passed, a moment before. Nobody can receive it any more; the handler ends as
    cancelled, which grpc.aio logs at debug level, instead of an ERROR traceback."""
    try:
        yield
    except grpc.aio.InternalError as exc:
        raise asyncio.CancelledError("the call was already over") from exc


async def abort(context: grpc.aio.ServicerContext, exc: e.LoraServeError):
    status = rich_status(exc)
    async with call_over():
        await context.abort(status_code(exc), exc.message,
                            trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),))


def _deadline_passed() -> NoReturn:
    # The caller's own deadline has fired on its side: it has its DEADLINE_EXCEEDED, and gRPC ends
    # the call on this side at the same moment, so sending a status would race with that (an
    # ExecuteBatchError logged as an ERROR whenever gRPC wins). The handler just ends.
    raise asyncio.CancelledError("the caller's deadline passed")


async def _abort_internal(context: grpc.aio.ServicerContext, where: str):
    # A bug, not a refusal: the traceback goes to the log, never its text to the caller (grpc.aio
    # would answer UNKNOWN with it).
    log.exception("%s failed unexpectedly", where)
    await abort(context, e.LoraServeError("internal error; the server logged the details"))


def unary_errors(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except e.LoraServeError as exc:
            await abort(context, exc)
        except asyncio.TimeoutError:
            _deadline_passed()
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _abort_internal(context, method.__qualname__)
    return wrapper


def stream_errors(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            # Closed here when this generator is (a caller gone mid-stream), in this task.
            async with contextlib.aclosing(method(self, request, context)) as items:
                async for item in items:
                    yield item
        except e.LoraServeError as exc:
            await abort(context, exc)
        except asyncio.TimeoutError:
            _deadline_passed()
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _abort_internal(context, method.__qualname__)
    return wrapper
