"""InferenceService: validate at the edge, queue on the scheduler, convert the answer back."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable

from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from scheduler.errors import LoraServeError, NotReady
from scheduler.scheduler import Scheduler, Ticket
from scheduler.types import Completion, TextDelta
from server.adapters import AdapterStore
from server.convert import RequestLimits, check_fields, delta_pb, final_chunk_pb, from_pb, to_pb
from server.errors import stream_errors, unary_errors

log = logging.getLogger("loraserve.requests")


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, adapters: AdapterStore, limits: RequestLimits):
        self._adapters = adapters
        self._limits = limits
        self._scheduler: Scheduler | None = None
        self._encode: Callable[[str], list[int]] | None = None

    def ready(self, scheduler: Scheduler, encode: Callable[[str], list[int]]) -> None:
        """Called once the model is loaded; until then Generate answers UNAVAILABLE."""
        self._scheduler, self._encode = scheduler, encode

    async def _submit(self, request: pb.GenerateRequest) -> tuple[Ticket, str]:
        """Returns the ticket and the request id (made up here when the caller sent none)."""
        if self._scheduler is None:
            raise NotReady("the model is still loading; retry shortly")
        check_fields(request, self._limits)
        adapter = self._adapters.resolve(request.adapter_id)
        prompt_ids = await asyncio.to_thread(self._encode, request.prompt)
        req = from_pb(request, adapter, prompt_ids, self._limits)
        return self._scheduler.submit(req), req.request_id

    @unary_errors
    async def Generate(self, request, context):
        started = time.perf_counter()
        try:
            ticket, _ = await self._submit(request)
            try:
                completion = await asyncio.wait_for(ticket.result(), context.time_remaining())
            finally:
                ticket.cancel()
        except LoraServeError as exc:
            _log_request(request, None, started, exc.reason)
            raise
        _log_request(request, completion, started, "OK")
        return to_pb(completion)

    @stream_errors
    async def GenerateStream(self, request, context):
        started = time.perf_counter()
        try:
            ticket, request_id = await self._submit(request)
        except LoraServeError as exc:
            _log_request(request, None, started, exc.reason)
            raise
        try:
            async for item in _until_deadline(ticket.events(), context):
                if isinstance(item, TextDelta):
                    yield delta_pb(request_id, item.text)
                else:
                    _log_request(request, item, started, "OK")
                    yield final_chunk_pb(item)
        finally:
            ticket.cancel()


async def _until_deadline(events: AsyncIterator, context) -> AsyncIterator:
    """grpc.aio does not cancel a handler when its deadline passes, so each wait is bounded here;
    on expiry the caller's `finally` withdraws the ticket and the client has its DEADLINE_EXCEEDED."""
    while True:
        try:
            yield await asyncio.wait_for(anext(events), context.time_remaining())
        except StopAsyncIteration:
            return


def _log_request(request: pb.GenerateRequest, c: Completion | None, started: float, status: str) -> None:
    """One structured line per request."""
    line = {"request_id": c.request_id if c else request.request_id, "adapter_id": request.adapter_id,
            "status": status, "total_ms": round((time.perf_counter() - started) * 1e3, 2)}
    if c is not None:
        t = c.timings
        line.update(adapter=c.adapter.id, version=c.adapter.version, load_source=c.load_source.value,
                    queue_ms=round(t.queue_ms, 2), load_ms=round(t.load_ms, 2),
                    generation_ms=round(t.prefill_ms + t.decode_ms, 2), output_tokens=c.output_tokens)
    log.info(json.dumps(line))
