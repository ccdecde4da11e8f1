"""One interceptor in front of every service: who is calling, may they, and how many calls
they already have open.

Health and reflection stay open (load balancers and grpcurl need them without a token). The
admin service needs an admin caller. Inference calls count against the caller's stream limit,
so one client cannot hold every queue slot and batch row; the caller's identity is the
bearer token's client or, when authentication is off, the value of the operator's trusted
client-id metadata key, else the peer's address.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import replace
from typing import Callable, Iterator

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from loraserve.v1 import admin_pb2, inference_pb2
from loraserve.scheduler.errors import InvalidArgument, LoraServeError, TooManyStreams
from loraserve.server.auth import CALLER, Authenticator, Caller
from loraserve.server.errors import abort, call_over
from loraserve.server.metrics import Metrics
from loraserve.server.requestlog import log_request

OPEN_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME,
                           "grpc.reflection.v1.ServerReflection"})
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdapterAdminService"].full_name
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
MAX_CLIENT_ID_CHARS = 128

class _Undecodable:
    """Handed to the behaviour instead of a message when the request bytes do not parse."""


UNDECODABLE = _Undecodable()


def _lenient(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    # grpc.aio parses before any handler runs and answers a parse error with UNKNOWN and the
    # parser's text; passing a marker on lets the behaviour refuse it as INVALID_ARGUMENT.
    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError:
            return UNDECODABLE
    return parse


class AccessInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, metrics: Metrics, max_streams_per_client: int = 0,
                 client_id_key: str = "", base_model: Callable[[], str] = str):
        """`base_model`: the served model's id for the request log (known once it is loaded)."""
        self._auth = auth
        self._metrics = metrics
        self._base_model = base_model
        self._limit = max_streams_per_client
        self._client_id_key = client_id_key
        self.open_calls: Counter[str] = Counter()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/", 1)[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        admin, counted = service == ADMIN_SERVICE, service == INFERENCE_SERVICE
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary(request, context):
                started = time.perf_counter()
                try:
                    with self.admitted(request, context, admin, counted):
                        return await behavior(request, context)
                except LoraServeError as exc:
                    await self.refuse(request, context, exc, counted, started)

            return grpc.unary_unary_rpc_method_handler(unary, _lenient(handler.request_deserializer),
                                                       handler.response_serializer)
        if handler.unary_stream:
            stream = handler.unary_stream

            async def streaming(request, context):
                # Written here (grpc.aio's writer form), not yielded back to grpc.aio: when the
                # caller goes away during a write, the service's generator is closed in this task
                # (its status, span and log line see it), where grpc.aio would leave it suspended
                # for the garbage collector to close later, elsewhere, as if it had ended well.
                started = time.perf_counter()
                try:
                    with self.admitted(request, context, admin, counted):
                        async with contextlib.aclosing(stream(request, context)) as items:
                            async for item in items:
                                async with call_over():
                                    await context.write(item)
                except LoraServeError as exc:
                    await self.refuse(request, context, exc, counted, started)

            return grpc.unary_stream_rpc_method_handler(streaming, _lenient(handler.request_deserializer),
                                                        handler.response_serializer)
        raise TypeError(f"{details.method}: only unary and server-streaming methods are served")

    async def refuse(self, request, context, exc: LoraServeError, counted: bool, started: float) -> None:
        # Services count and log the calls they handle (and answer their own errors), so what
        # reaches here was refused before the service saw it: counted and logged here, once.
        if counted:
            caller = CALLER.get(None)
            self._metrics.request_done("-", exc.reason, time.perf_counter() - started, None)
            # Tokenize and ListModels requests name no request id or adapter.
            log_request(request_id=getattr(request, "request_id", ""), client=caller and caller.client,
                        client_key=caller.key if caller else "-", adapter_id=getattr(request, "adapter_id", ""),
                        base_model=self._base_model(), status=exc.reason, started=started)
        await abort(context, exc)

    # admitted and refuse are also how the HTTP front (server/http.py) admits its requests.
    @contextlib.contextmanager
    def admitted(self, request, context, admin: bool, counted: bool) -> Iterator[None]:
        metadata = context.invocation_metadata()
        caller = self._auth.admin(metadata) if admin else self._auth.identify(metadata)
        if counted:
            caller = replace(caller, key=self._client_key(caller, context))
        CALLER.set(caller)
        if request is UNDECODABLE:
            raise InvalidArgument("request", "cannot be decoded (a corrupt message, or invalid UTF-8 in a "
                                             "string field)")
        if not counted:
            yield
            return
        key = caller.key
        if self._limit and self.open_calls[key] >= self._limit:
            raise TooManyStreams(key, self._limit)
        self.open_calls[key] += 1
        try:
            yield
        finally:
            self.open_calls[key] -= 1
            if not self.open_calls[key]:
                del self.open_calls[key]

    def _client_key(self, caller: Caller, context) -> str:
        if caller.client is not None:
            return caller.client
        if self._client_id_key:
            named = next((v for k, v in context.invocation_metadata() or () if k == self._client_id_key), "")
            if len(named) > MAX_CLIENT_ID_CHARS:
                raise InvalidArgument(self._client_id_key, f"is longer than {MAX_CLIENT_ID_CHARS} characters")
            if named:
                return named
        peer = context.peer() or "unknown"
        return peer.rsplit(":", 1)[0]  # ipv4:127.0.0.1:54321 -> ipv4:127.0.0.1
