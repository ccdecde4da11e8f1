"""The OpenAI-compatible HTTP front: GET /v1/models, POST /v1/completions and /v1/chat/completions.

FastAPI on uvicorn, in the gRPC server's own process and event loop. Each request is translated
(server/openai_json.py) into a loraserve.v1.GenerateRequest and handed to the same
InferenceServicer methods a gRPC call reaches, behind the same admission (bearer token, client
key, stream limit: AccessInterceptor.admitted), with `HttpContext` standing in for grpc.aio's
servicer context. So validation, scheduling, metrics, spans, the request log and the errors are
the gRPC front's; a refusal arrives as the gRPC status the servicer aborts with (code and
google.rpc details), and `ERRORS` turns it into OpenAI's JSON error with an HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from typing import AsyncIterator, Awaitable, TypeVar

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.exceptions import HTTPException

from loraserve.v1 import inference_pb2 as pb
from loraserve.scheduler.errors import InvalidArgument, LoraServeError
from loraserve.server import openai_json as oj
from loraserve.server.adapters import AdapterRegistry
from loraserve.server.interceptors import AccessInterceptor
from loraserve.server.service import InferenceServicer

T = TypeVar("T")

ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    # gRPC status -> (HTTP status, OpenAI error type). The ErrorInfo reason goes in `code`.
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
"""Anything else (INTERNAL, UNKNOWN) is 500 server_error."""
ADAPTER_REASONS = frozenset({"ADAPTER_NOT_FOUND", "ADAPTER_NOT_ACTIVE", "ADAPTER_AMBIGUOUS", "ADAPTER_INCOMPATIBLE",
                             "ADAPTER_LOAD_FAILED", "PERMISSION_DENIED"})
"""Reasons about the adapter asked for: their `param` is `model`."""


class Aborted(grpc.aio.AbortError):
    """What HttpContext.abort raises: the status a servicer (or the admission) answered with."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata=()):
        super().__init__(details)
        self.code, self.details = code, details
        raw = dict(trailing_metadata or ()).get("grpc-status-details-bin")
        self.status = status_pb2.Status.FromString(raw) if raw else status_pb2.Status()

    def detail(self, kind):
        """The first google.rpc detail of type `kind` in the status, or None."""
        for any_ in self.status.details:
            if any_.Is(kind.DESCRIPTOR):
                found = kind()
                any_.Unpack(found)
                return found
        return None


class HttpContext:
    """What InferenceServicer, the error wrappers and AccessInterceptor use of a grpc.aio servicer
    context, for one HTTP request: its headers as metadata (authorization, traceparent, the
    trusted client-id key), no deadline, and an abort that raises Aborted."""

    def __init__(self, request: Request):
        self._metadata = tuple(request.headers.items())
        client = request.client
        host = client.host if client else "unknown"
        self._peer = f"ipv6:[{host}]:{client.port}" if ":" in host else f"ipv4:{host}:{client.port if client else 0}"

    def invocation_metadata(self):
        return self._metadata

    def carry(self, span: trace.Span) -> None:
        """Make `span` the parent the servicer's RPC span names: its trace context replaces the
        caller's in the metadata (a no-op span, tracing off, leaves the caller's)."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        self._metadata = tuple((k, v) for k, v in self._metadata if k not in carrier) + tuple(carrier.items())

    def time_remaining(self) -> float | None:
        return None  # HTTP callers set no deadline the server could see; their own timeouts close the connection

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        raise Aborted(code, details, trailing_metadata)


def error_body(exc: Aborted, chat: bool) -> tuple[int, dict, dict]:
    """(HTTP status, OpenAI error JSON, headers) for a refusal."""
    status, kind = ERRORS.get(exc.code, (500, "server_error"))
    info = exc.detail(error_details_pb2.ErrorInfo)
    reason = info.reason if info else exc.code.name
    field = info.metadata.get("field") if info else None
    name = oj.param(field, chat) if field else ("model" if reason in ADAPTER_REASONS else None)
    headers = {}
    if (retry := exc.detail(error_details_pb2.RetryInfo)) is not None:
        headers["retry-after"] = str(max(1, round(retry.retry_delay.ToMilliseconds() / 1e3)))
    return status, {"error": {"message": exc.details, "type": kind, "param": name, "code": reason}}, headers


def _error_response(exc: Aborted, chat: bool = False, span: trace.Span | None = None) -> JSONResponse:
    status, body, headers = error_body(exc, chat)
    if span is not None:
        span.set_attribute("http.response.status_code", status)
        _failed(span, exc)
    return JSONResponse(body, status, headers)


def _failed(span: trace.Span, exc: Aborted) -> None:
    span.set_status(StatusCode.ERROR, exc.details)


class OpenAIFront:
    def __init__(self, servicer: InferenceServicer, access: AccessInterceptor, registry: AdapterRegistry,
                 max_body_bytes: int, tracer: trace.Tracer):
        """`tracer`: the server's; each generation gets an HTTP server span ("POST /v1/completions"),
        the parent of the servicer's RPC span, so a trace says which front a request came in by."""
        self._servicer, self._access, self._registry = servicer, access, registry
        self._tracer = tracer
        self._max_body = max_body_bytes
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI(title="loraserve (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])

        @app.exception_handler(HTTPException)
        async def not_here(request: Request, exc: HTTPException) -> JSONResponse:
            return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {exc.detail}",
                                           "type": "invalid_request_error", "param": None,
                                           "code": "NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT"}},
                                exc.status_code)
        return app

    @property
    def fingerprint(self) -> str | None:
        """system_fingerprint: the served base model's revision (the adapter version is in `model`)."""
        revision = self._registry.base.revision
        return f"fp_{revision[:12]}" if revision else None

    # -- admission: the interceptor's, as for a gRPC call ----------------------------------------
    async def _unary(self, req: pb.GenerateRequest, ctx: HttpContext) -> pb.GenerateResponse:
        started = time.perf_counter()
        try:
            with self._access.admitted(req, ctx, admin=False, counted=True):
                return await self._servicer.Generate(req, ctx)
        except LoraServeError as exc:
            await self._access.refuse(req, ctx, exc, True, started)

    async def _stream(self, req: pb.GenerateRequest, ctx: HttpContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        started = time.perf_counter()
        try:
            with self._access.admitted(req, ctx, admin=False, counted=True):
                async with contextlib.aclosing(self._servicer.GenerateStream(req, ctx)) as items:
                    async for item in items:
                        yield item
        except LoraServeError as exc:
            await self._access.refuse(req, ctx, exc, True, started)

    async def _malformed(self, ctx: HttpContext, problem: LoraServeError) -> None:
        """Raises Aborted for a body that makes no GenerateRequest, as gRPC refuses an undecodable
        message: once the caller is identified (no token: 401, not 400), counted and logged."""
        started, req = time.perf_counter(), pb.GenerateRequest()
        try:
            with self._access.admitted(req, ctx, admin=False, counted=True):
                raise problem
        except LoraServeError as exc:
            await self._access.refuse(req, ctx, exc, True, started)

    # -- routes -----------------------------------------------------------------------------------
    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool):
        ctx = HttpContext(request)
        route = request.url.path
        span = self._tracer.start_span(f"{request.method} {route}", kind=SpanKind.SERVER,
                                       context=propagate.extract(dict(ctx.invocation_metadata())),
                                       attributes={"http.request.method": request.method, "http.route": route})
        ctx.carry(span)
        streaming = False
        try:
            response = await self._answer(request, ctx, chat, span)
            streaming = isinstance(response, StreamingResponse)
            return response
        finally:
            if not streaming:  # a stream's span ends with its last event
                span.end()

    async def _answer(self, request: Request, ctx: HttpContext, chat: bool, span: trace.Span) -> Response:
        created = int(time.time())
        try:
            try:
                call = oj.to_request(await self._body(request), chat)
            except LoraServeError as exc:
                await self._malformed(ctx, exc)
        except Aborted as exc:
            return _error_response(exc, chat, span)
        if not call.stream:
            try:
                resp = await _unless_gone(request, self._unary(call.request, ctx))
            except Aborted as exc:
                return _error_response(exc, chat, span)
            if resp is None:
                return Response(status_code=499)  # nobody reads it
            span.set_attribute("http.response.status_code", 200)
            return JSONResponse(oj.completion(call, resp, created, self.fingerprint))
        items = self._stream(call.request, ctx)
        try:  # the first message decides between an error status and a 200 event stream
            first = await _unless_gone(request, anext(items))
        except Aborted as exc:
            await items.aclose()
            return _error_response(exc, chat, span)
        if first is None:
            await items.aclose()
            return Response(status_code=499)
        span.set_attribute("http.response.status_code", 200)
        return StreamingResponse(self._events(call, first, items, created, span), media_type="text/event-stream")

    async def _events(self, call: oj.Call, first: pb.GenerateStreamResponse,
                      items: AsyncIterator[pb.GenerateStreamResponse], created: int,
                      span: trace.Span) -> AsyncIterator[str]:
        """Server-sent events: a chunk per message, the usage chunk when asked for, then [DONE]. A
        failure mid-stream (the status is already 200) is sent as an event holding the error."""
        chunks = oj.Chunks(call, created, self.fingerprint)
        try:
            async with contextlib.aclosing(items):
                try:
                    if (chunk := chunks.chunk(first)) is not None:
                        yield _event(chunk)
                    async for item in items:
                        if (chunk := chunks.chunk(item)) is not None:
                            yield _event(chunk)
                except Aborted as exc:
                    _failed(span, exc)
                    yield _event(error_body(exc, call.chat)[1])
                    return
            if (chunk := chunks.usage_chunk()) is not None:
                yield _event(chunk)
            yield "data: [DONE]\n\n"
        finally:
            span.end()

    async def _body(self, request: Request):
        raw = await request.body()
        if len(raw) > self._max_body:
            raise InvalidArgument("body", f"is {len(raw)} bytes; the limit is {self._max_body} (--max-message-bytes)")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise InvalidArgument("body", f"is not valid JSON ({exc})") from None

    async def models(self, request: Request):
        ctx, req = HttpContext(request), pb.ListModelsRequest()
        try:
            try:
                with self._access.admitted(req, ctx, admin=False, counted=False):
                    listed = await self._servicer.ListModels(req, ctx)
            except LoraServeError as exc:
                await self._access.refuse(req, ctx, exc, False, 0.0)
        except Aborted as exc:
            return _error_response(exc)
        return JSONResponse({"object": "list", "data": oj.models(listed)})


async def _unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result; None if the client disconnects first, `work` then cancelled as grpc.aio
    cancels a handler whose caller went away (the ticket is withdrawn, the request logged
    CANCELLED). Starlette cancels a streaming response itself; a plain one would run on."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the CLI's own SIGTERM handler drains gRPC and HTTP together."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (so a port in use fails start-up, and port 0 is known)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise RuntimeError(f"the OpenAI-compatible HTTP front cannot listen on {host}:{port} ({exc.strerror}); "
                           "--http-port chooses another port, 0 turns it off") from exc
    # Accepted connections inherit it. Without it, on a reused connection, the response body
    # written after its headers waits for the client's delayed ACK: 40 ms per request (measured).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def server(front: OpenAIFront, tls: tuple | None, close_grace_s: float) -> uvicorn.Server:
    """`tls`: (cert, key, client CA or None), the gRPC listener's; the same certificates serve HTTPS
    (and require client certificates when the CA is given)."""
    extra = {}
    if tls is not None:
        cert, key, ca = tls
        extra = dict(ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certs=ca and str(ca),
                     ssl_cert_reqs=ssl.CERT_REQUIRED if ca else ssl.CERT_NONE)
    cfg = uvicorn.Config(front.app, log_config=None, access_log=False, lifespan="off", ws="none",
                         server_header=False, timeout_graceful_shutdown=close_grace_s, **extra)
    return _Server(cfg)
