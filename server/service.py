"""InferenceService: validate at the edge, queue on the scheduler, convert the answer back.

A request for n choices is n scheduler requests submitted together (the same id and prompt; the
prefix cache publishes a prompt's blocks once its prefill succeeded, so choices admitted in one
step each compute the prompt); the RPC answers once all are done, or fails, withdrawing the
others, when one fails. It is one RPC throughout: one span, one
metrics count and one log line, with the choices' output tokens and costs added up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence

from loraserve.contract import ROUTING_HEADER
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.runner.tokens import Tokens
from loraserve.scheduler.errors import InvalidArgument, LoraServeError, NotReady
from loraserve.scheduler.fallback import falls_back, to_base
from loraserve.scheduler.scheduler import Scheduler, Ticket
from loraserve.scheduler.types import BASE, Completion, GenerationRequest, ResponseFormat, TextDelta
from loraserve.server.adapters import AdapterRegistry
from loraserve.server.auth import current_caller
from loraserve.server.convert import (FALLBACKS, RequestLimits, check_fields, check_messages, check_token_ids, combined,
                            delta_pb, fan_out, final_chunk_pb, from_pb, to_pb, tokenize_pb)
from loraserve.server.errors import stream_errors, unary_errors
from loraserve.server.requestlog import log_request
from loraserve.server.rollouts import RolloutWatch, Split
from loraserve.server.shadow import ShadowMirror
from loraserve.server.telemetry import Telemetry, fail

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
        self._tokens: Tokens | None = None
        self._limits: RequestLimits | None = None
        self._check_format: Callable[[ResponseFormat], None] | None = None
        self.rollouts = RolloutWatch(registry, telemetry.metrics)
        self.shadows = ShadowMirror(registry, telemetry.metrics)

    def ready(self, scheduler: Scheduler, tokens: Tokens, limits: RequestLimits,
              check_format: Callable[[ResponseFormat], None]) -> None:
        """Called once the model is loaded (its context limit is known then); until then every
        method answers UNAVAILABLE. `check_format` refuses a response_format the engine cannot enforce."""
        self._scheduler, self._tokens, self._limits, self._check_format = scheduler, tokens, limits, check_format

    def _check_ready(self) -> None:
        if self._scheduler is None:
            raise NotReady("the model is still loading; retry shortly")

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        """The prompt's ids, from whichever form it came in. Blocking: run on a thread."""
        if request.messages:
            return self._tokens.encode_chat([(m.role, m.content) for m in request.messages])
        if request.prompt_token_ids:
            check_token_ids(request.prompt_token_ids, self._tokens.vocab_size)
            return list(request.prompt_token_ids)
        return self._tokens.encode(request.prompt)

    async def _submit(self, request: pb.GenerateRequest, context, call: _Call, span) -> list[Ticket]:
        """One ticket per choice, in index order."""
        caller = current_caller()
        call.client, call.key = caller.client, caller.key
        self._check_ready()
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
        may_fall_back = falls_back(FALLBACKS[request.fallback], found.passport.fallback if found.passport else None)
        call.adapter = BASE.id if found.problem is not None and may_fall_back else found.adapter.id
        if found.problem is not None and not may_fall_back:
            raise found.problem
        prompt_ids = await asyncio.to_thread(self._prompt_ids, request)
        req = from_pb(request, found.adapter, prompt_ids, self._limits, fallback_to_base=may_fall_back,
                      client=call.key)
        if found.problem is not None:
            req = to_base(req, found.problem)
        if req.response_format is not None:  # compiled here, before queueing, off the event loop
            await asyncio.to_thread(self._check_format, req.response_format)
        tickets: list[Ticket] = []
        try:
            for choice in fan_out(req, request.n):
                tickets.append(self._scheduler.submit(choice, context.time_remaining()))
        except BaseException:
            for ticket in tickets:
                ticket.cancel()
            raise
        call.req = req
        call.shadow = self.shadows.mirror(self._scheduler, req)
        self._telemetry.submitted(span, req)
        return tickets

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
                self._telemetry.finished(span, call.req, call.completion, request.adapter_id)
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
            tickets = await self._submit(request, context, call, span)
            waits = [asyncio.ensure_future(ticket.result()) for ticket in tickets]
            try:
                done, _ = await asyncio.wait(waits, timeout=context.time_remaining(),
                                             return_when=asyncio.FIRST_EXCEPTION)
                failed = [exc for exc in (w.exception() for w in done) if exc is not None]
                if failed:
                    raise failed[0]
                if len(done) < len(waits):
                    raise TimeoutError
                choices = [w.result() for w in waits]
            finally:
                for wait, ticket in zip(waits, tickets):  # one choice failed: the others' waits end here
                    wait.cancel()
                    ticket.cancel()
            call.completion = combined(choices)
            return to_pb(choices, self._tokens.texts)

    @stream_errors
    async def GenerateStream(self, request, context):
        with self._observed("GenerateStream", request, context) as (call, span):
            tickets = await self._submit(request, context, call, span)
            done: dict[int, Completion] = {}
            texts = self._tokens.texts
            try:
                async with contextlib.aclosing(_interleave(tickets)) as items:
                    async for index, item in _until_deadline(items, context):
                        if isinstance(item, TextDelta):
                            yield delta_pb(call.req.request_id, item, index, texts)
                        else:
                            done[index] = item
                            call.completion = combined([done[i] for i in sorted(done)])
                            yield final_chunk_pb(item, index, texts)
            finally:
                for ticket in tickets:
                    ticket.cancel()

    @unary_errors
    async def Tokenize(self, request, context):
        self._check_ready()
        if bool(request.text) == bool(request.messages):
            raise InvalidArgument("text", "send exactly one of text and messages")
        check_messages(request.messages)
        if request.messages:
            text = await asyncio.to_thread(self._tokens.render, [(m.role, m.content) for m in request.messages])
        else:
            text = request.text
        ids, spans = await asyncio.to_thread(self._tokens.spans, text, bool(request.messages))
        return tokenize_pb(text, ids, spans)

    @unary_errors
    async def ListModels(self, request, context):
        self._check_ready()
        caller = current_caller()
        base = pb.BaseModel(id=self._registry.base.model_id, max_context=self._limits.max_context,
                            has_chat_template=self._tokens.has_chat_template)
        served = await asyncio.to_thread(self._registry.servable, caller.client)
        return pb.ListModelsResponse(base=base, adapters=[
            pb.ServedModel(id=s.name, version=s.version, aliases=s.aliases, versions=s.others) for s in served])


async def _interleave(tickets: Sequence[Ticket]) -> AsyncIterator[tuple[int, TextDelta | Completion]]:
    """Every ticket's events as they come, with its index, until each has its completion; the
    first error ends them all (the caller withdraws the tickets)."""
    if len(tickets) == 1:  # no tasks for the common case
        async for item in tickets[0].events():
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ticket: Ticket) -> None:
        try:
            async for item in ticket.events():
                queue.put_nowait((index, item))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((index, exc))

    pumps = [asyncio.create_task(pump(i, t)) for i, t in enumerate(tickets)]
    try:
        left = len(tickets)
        while left:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= isinstance(item, Completion)
            yield index, item
    finally:
        for task in pumps:
            task.cancel()


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
