"""InferenceService: validate at the edge, queue on the scheduler, convert the answer back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Iterator

from loraserve.contract import ROUTING_HEADER
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from scheduler.errors import InvalidArgument, LoraServeError, NotReady
from scheduler.scheduler import Scheduler, Ticket
from scheduler.types import BASE, Completion, GenerationRequest, TextDelta
from server.adapters import AdapterRegistry
from server.auth import current_caller
from server.convert import FALLBACKS, RequestLimits, check_fields, delta_pb, final_chunk_pb, from_pb, to_pb
from server.errors import stream_errors, unary_errors
from server.requestlog import log_request
from server.rollouts import RolloutWatch, Split
from server.shadow import ShadowMirror
from server.telemetry import Telemetry, fail

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class _Call:
    """What one RPC learns as it goes, for its span, metrics and log line."""

    client: str | None = None
    key: str = "-"
    """Caller.key (the client, a trusted metadata value or the peer's address): whom cost is counted for."""
    adapter: str = "-"
    """The metrics label: the adapter that serves (or would have served) once resolved."""
    req: GenerationRequest | None = None
    completion: Completion | None = None
    status: str = "OK"
    split: Split | None = None
    """Set when a running canary routed the request."""
    shadow: tuple[Ticket, str] | None = None
    """Its shadow's ticket and version, when one was mirrored."""


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, registry: AdapterRegistry, telemetry: Telemetry):
        self._registry = registry
        self._telemetry = telemetry
        self._scheduler: Scheduler | None = None
        self._encode: Callable[[str], list[int]] | None = None
        self._limits: RequestLimits | None = None
        self.rollouts = RolloutWatch(registry, telemetry.metrics)
        self.shadows = ShadowMirror(registry, telemetry.metrics)

    def ready(self, scheduler: Scheduler, encode: Callable[[str], list[int]], limits: RequestLimits) -> None:
        """Called once the model is loaded (its context limit is known then); until then Generate
        answers UNAVAILABLE."""
        self._scheduler, self._encode, self._limits = scheduler, encode, limits

    async def _submit(self, request: pb.GenerateRequest, context, call: _Call, span) -> Ticket:
        caller = current_caller()
        call.client, call.key = caller.client, caller.key
        if self._scheduler is None:
            raise NotReady("the model is still loading; retry shortly")
        self._scheduler.check_accepting()
        check_fields(request, self._limits)
        routed = next((v for k, v in context.invocation_metadata() or () if k == ROUTING_HEADER), None)
        if routed is not None and routed != request.adapter_id:
            raise InvalidArgument(ROUTING_HEADER, f"metadata names {routed!r} but the request names "
                                               f"{request.adapter_id!r}; a router would send it to the wrong replica")
        with self._telemetry.resolve(span, request.adapter_id):
            found = self._registry.resolve(request.adapter_id, call.client)
        call.split = found.split
        if found.split is not None:
            span.set_attribute("loraserve.canary.side", "canary" if found.split.to_canary else "stable")
        may_fall_back = found.fallback_allowed(FALLBACKS[request.fallback])
        call.adapter = BASE.id if found.problem is not None and may_fall_back else found.adapter.id
        if found.problem is not None and not may_fall_back:
            raise found.problem
        prompt_ids = await asyncio.to_thread(self._encode, request.prompt)
        if found.problem is None:
            req = from_pb(request, found.adapter, prompt_ids, self._limits, fallback_to_base=may_fall_back,
                          client=call.key)
        else:
            req = replace(from_pb(request, BASE, prompt_ids, self._limits, client=call.key),
                          fallback_reason=found.problem.reason,
                          requested=found.adapter.key)
        ticket = self._scheduler.submit(req, context.time_remaining())
        call.req = req
        call.shadow = self.shadows.mirror(self._scheduler, req)
        self._telemetry.submitted(span, req)
        return ticket

    @contextlib.contextmanager
    def _observed(self, method: str, request: pb.GenerateRequest, context) -> Iterator[tuple[_Call, object]]:
        """The RPC's span; on the way out, its status, phase spans, metrics and one log line,
        whatever happened."""
        started, call, why = time.perf_counter(), _Call(), ""
        with self._telemetry.rpc(f"{SERVICE}/{method}", context.invocation_metadata()) as span:
            try:
                yield call, span
            except LoraServeError as exc:
                call.status, why = exc.reason, exc.message
                raise
            except TimeoutError:
                call.status, why = "DEADLINE_EXCEEDED", "the caller's deadline passed"
                raise
            except (asyncio.CancelledError, GeneratorExit):
                # grpc.aio cancels the handler when the caller hangs up or its deadline passes; a
                # stream whose caller went away while it waited at a yield is closed instead.
                passed = context.time_remaining() == 0
                call.status = "DEADLINE_EXCEEDED" if passed else "CANCELLED"
                why = "the caller's deadline passed" if passed else "the caller went away"
                raise
            except Exception as exc:
                call.status, why = "INTERNAL", f"{type(exc).__name__}: {exc}"
                raise
            finally:
                if call.status != "OK":
                    fail(span, call.status, why)
                self._telemetry.finished(span, call.req, call.completion)
                c = call.completion
                label = c.adapter.id if c else call.adapter
                self._telemetry.metrics.request_done(label, call.status, time.perf_counter() - started, c, call.key)
                self.rollouts.observe(call.split, call.status, c)
                self.shadows.settle(call.shadow, c if call.status == "OK" else None)
                log_request(request_id=c.request_id if c else (call.req.request_id if call.req else request.request_id),
                            client=call.client, client_key=call.key, adapter_id=request.adapter_id,
                            base_model=self._registry.base.model_id, status=call.status, started=started,
                            completion=c)

    @unary_errors
    async def Generate(self, request, context):
        with self._observed("Generate", request, context) as (call, span):
            ticket = await self._submit(request, context, call, span)
            try:
                call.completion = await asyncio.wait_for(ticket.result(), context.time_remaining())
            finally:
                ticket.cancel()
            return to_pb(call.completion)

    @stream_errors
    async def GenerateStream(self, request, context):
        with self._observed("GenerateStream", request, context) as (call, span):
            ticket = await self._submit(request, context, call, span)
            try:
                async for item in _until_deadline(ticket.events(), context):
                    if isinstance(item, TextDelta):
                        yield delta_pb(call.req.request_id, item.text)
                    else:
                        call.completion = item
                        yield final_chunk_pb(item)
            finally:
                ticket.cancel()


async def _until_deadline(events: AsyncIterator, context) -> AsyncIterator:
    """grpc.aio does not cancel a handler when its deadline passes, so each wait is bounded here;
    on expiry the caller's `finally` withdraws the ticket and the client has its DEADLINE_EXCEEDED."""
    while True:
        try:
            # asyncio.timeout, not wait_for: no task per message (3.11's wait_for makes one).
            async with asyncio.timeout(context.time_remaining()):
                item = await anext(events)
        except StopAsyncIteration:
            return
        yield item
