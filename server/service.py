"""InferenceService: validate at the edge, queue on the scheduler, convert the answer back."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import AsyncIterator, Callable

from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from scheduler.errors import LoraServeError, NotReady
from scheduler.scheduler import Scheduler, Ticket
from scheduler.types import BASE, Completion, TextDelta
from server.adapters import AdapterRegistry
from server.auth import Authenticator
from server.convert import FALLBACKS, RequestLimits, check_fields, delta_pb, final_chunk_pb, from_pb, to_pb
from server.errors import stream_errors, unary_errors

log = logging.getLogger("loraserve.requests")


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, registry: AdapterRegistry, limits: RequestLimits, auth: Authenticator):
        self._registry = registry
        self._limits = limits
        self._auth = auth
        self._scheduler: Scheduler | None = None
        self._encode: Callable[[str], list[int]] | None = None

    def ready(self, scheduler: Scheduler, encode: Callable[[str], list[int]]) -> None:
        """Called once the model is loaded; until then Generate answers UNAVAILABLE."""
        self._scheduler, self._encode = scheduler, encode

    async def _submit(self, request: pb.GenerateRequest, context) -> tuple[Ticket, str]:
        """Returns the ticket and the request id (made up here when the caller sent none)."""
        caller = self._auth.identify(context.invocation_metadata())
        if self._scheduler is None:
            raise NotReady("the model is still loading; retry shortly")
        check_fields(request, self._limits)
        found = self._registry.resolve(request.adapter_id, caller.client)
        may_fall_back = found.fallback_allowed(FALLBACKS[request.fallback])
        if found.problem is not None and not may_fall_back:
            raise found.problem
        prompt_ids = await asyncio.to_thread(self._encode, request.prompt)
        if found.problem is None:
            req = from_pb(request, found.adapter, prompt_ids, self._limits, fallback_to_base=may_fall_back)
        else:
            req = replace(from_pb(request, BASE, prompt_ids, self._limits), fallback_reason=found.problem.reason,
                          requested=f"{found.adapter.id}@{found.adapter.version}")
        return self._scheduler.submit(req), req.request_id

    @unary_errors
    async def Generate(self, request, context):
        started = time.perf_counter()
        try:
            ticket, _ = await self._submit(request, context)
            try:
                completion = await asyncio.wait_for(ticket.result(), context.time_remaining())
            finally:
                ticket.cancel()
        except LoraServeError as exc:
            self._log(request, context, None, started, exc.reason)
            raise
        self._log(request, context, completion, started, "OK")
        return to_pb(completion)

    @stream_errors
    async def GenerateStream(self, request, context):
        started = time.perf_counter()
        try:
            ticket, request_id = await self._submit(request, context)
        except LoraServeError as exc:
            self._log(request, context, None, started, exc.reason)
            raise
        try:
            async for item in _until_deadline(ticket.events(), context):
                if isinstance(item, TextDelta):
                    yield delta_pb(request_id, item.text)
                else:
                    self._log(request, context, item, started, "OK")
                    yield final_chunk_pb(item)
        finally:
            ticket.cancel()


    def _log(self, request, context, c: Completion | None, started: float, status: str) -> None:
        try:
            client = self._auth.identify(context.invocation_metadata()).client
        except LoraServeError:
            client = "unauthenticated"
        _log_request(request, client, self._registry.base.model_id, c, started, status)


async def _until_deadline(events: AsyncIterator, context) -> AsyncIterator:
    """grpc.aio does not cancel a handler when its deadline passes, so each wait is bounded here;
    on expiry the caller's `finally` withdraws the ticket and the client has its DEADLINE_EXCEEDED."""
    while True:
        try:
            yield await asyncio.wait_for(anext(events), context.time_remaining())
        except StopAsyncIteration:
            return


def _log_request(request: pb.GenerateRequest, client: str | None, base_model: str, c: Completion | None,
                 started: float, status: str) -> None:
    """One structured line per request."""
    line = {"request_id": c.request_id if c else request.request_id, "client": client or "anonymous",
            "adapter_id": request.adapter_id, "base_model": base_model,
            "status": status, "total_ms": round((time.perf_counter() - started) * 1e3, 2)}
    if c is not None:
        t = c.timings
        line.update(adapter=c.adapter.id, version=c.adapter.version, load_source=c.load_source.value,
                    queue_ms=round(t.queue_ms, 2), load_ms=round(t.load_ms, 2),
                    generation_ms=round(t.prefill_ms + t.decode_ms, 2), output_tokens=c.output_tokens)
        if c.fallback_reason:
            line.update(fallback_from=c.fallback_from, fallback_reason=c.fallback_reason)
    log.info(json.dumps(line))
