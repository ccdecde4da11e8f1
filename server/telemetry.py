"""OpenTelemetry tracing: one server span per RPC (a child of the caller's `traceparent`), child
spans per phase, and one span per batch phase linked to every request it served.

The SDK configures itself from the standard variables: the exporters from OTEL_TRACES_EXPORTER
(any installed exporter's name; `otlp` takes OTEL_EXPORTER_OTLP_PROTOCOL into account), each
exporter's endpoint, headers, certificate and timeout from its own OTEL_EXPORTER_OTLP_*
variables, the resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, the sampler from
OTEL_TRACES_SAMPLER(_ARG). Two rules are the server's: with OTEL_TRACES_EXPORTER unset, an
OTLP endpoint turns the `otlp` exporter on (and nothing else does: tracing is off by default),
and the service is `loraserve` unless named. OTEL_SDK_DISABLED=true turns tracing off.

The provider is this server's own, never the process-global one, so tests (and an embedding
service) can hand the server theirs.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Sequence

from opentelemetry import propagate, trace
from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER
from opentelemetry.sdk._configuration import _get_exporter_entry_point, _get_exporter_names, _import_exporters
from opentelemetry.sdk.environment_variables import (OTEL_EXPORTER_OTLP_ENDPOINT,
                                                     OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_SDK_DISABLED)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv._incubating.attributes.rpc_attributes import RPC_METHOD, RPC_SERVICE, RPC_SYSTEM
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from loraserve.contract import BASE_ADAPTER_ID
from loraserve.scheduler.types import AdapterRef, Completion, GenerationRequest, Tier
from loraserve.server.metrics import Metrics

TEXT_COMPLETION = gen_ai.GenAiOperationNameValues.TEXT_COMPLETION.value


def provider_from_env() -> TracerProvider | None:
    """A provider configured by the SDK from the OTEL_* environment, or None when tracing is off.
    Raises ValueError for an exporter name no installed package provides."""
    env = os.environ
    if env.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return None
    if OTEL_TRACES_EXPORTER not in env and (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT in env
                                            or OTEL_EXPORTER_OTLP_ENDPOINT in env):
        names = [_get_exporter_entry_point("otlp", "traces")]
    else:
        names = _get_exporter_names("traces")
    try:
        exporters, _, _ = _import_exporters(names, [], [])
    except RuntimeError as exc:
        raise ValueError(f"{OTEL_TRACES_EXPORTER}={env.get(OTEL_TRACES_EXPORTER)!r}: {exc}") from exc
    if not exporters:
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "loraserve"}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters.values():
        # Spans on stdout as they end; anything sent over a network goes in batches.
        processor = SimpleSpanProcessor if exporter is ConsoleSpanExporter else BatchSpanProcessor
        provider.add_span_processor(processor(exporter()))
    return provider


class Telemetry:
    """Tracing and metrics for requests; also the scheduler's Observer."""

    def __init__(self, provider: TracerProvider | None, metrics: Metrics, model_name: str = ""):
        self.provider = provider
        self.tracer = provider.get_tracer("loraserve") if provider else trace.NoOpTracer()
        self.metrics = metrics
        self.model_name = model_name
        self._inflight: dict[str, trace.SpanContext] = {}
        # The scheduler's clock is perf_counter; spans want epoch nanoseconds.
        self._offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    def _ns(self, t: float) -> int:
        return int(t * 1e9) + self._offset_ns

    # -- per request -----------------------------------------------------------
    @contextlib.contextmanager
    def rpc(self, method: str, metadata) -> Iterator[trace.Span]:
        """The RPC's server span, a child of the caller's W3C trace context when one is sent. It is
        never made the current span: a stream's generator may be closed from another task and
        context than the one that would have attached it, where detaching fails (OpenTelemetry's
        "Failed to detach context"); its children name it as their parent instead. The caller
        sets its status (`fail`).

        Made here, not by opentelemetry-instrumentation-grpc's aio server interceptor: that one
        sees only calls grpc.aio dispatches, while the HTTP front (server/http.py) calls the
        servicer directly, so its requests would have no RPC span under their `POST` span; and it
        attaches its span as the current context for the handler, the detach that fails above."""
        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        service, _, name = method.rpartition("/")
        span = self.tracer.start_span(method, context=propagate.extract(carrier), kind=SpanKind.SERVER,
                                      attributes={RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: name})
        try:
            yield span
        finally:
            span.end()

    @contextlib.contextmanager
    def resolve(self, parent: trace.Span, adapter_id: str) -> Iterator[trace.Span]:
        """Around the registry look-up only (no await inside, so attaching it as current is safe)."""
        with self.tracer.start_as_current_span("adapter.resolve", context=trace.set_span_in_context(parent),
                                               record_exception=False,
                                               attributes={"loraserve.adapter.requested": adapter_id}) as span:
            yield span

    def submitted(self, span: trace.Span, req: GenerationRequest) -> None:
        span.set_attributes({"loraserve.request_id": req.request_id, **_adapter_attrs(req.adapter)})
        self._inflight[req.request_id] = span.get_span_context()

    def finished(self, span: trace.Span, req: GenerationRequest | None, c: Completion | None,
                 asked: str = "") -> None:
        """Phase spans from the completion's timeline, as children of the RPC span, and the
        gen_ai timing metrics. `asked`: the adapter id the caller named (gen_ai.request.model; the
        base model's id when it named none or the base)."""
        if req is not None:
            self._inflight.pop(req.request_id, None)
        if c is None:
            return
        t, parent = c.timeline, trace.set_span_in_context(span)
        base = {**_adapter_attrs(c.adapter), "loraserve.request_id": c.request_id}

        def phase(name: str, start: float, end: float, attrs: dict) -> None:
            child = self.tracer.start_span(name, context=parent, start_time=self._ns(start), attributes=attrs)
            child.end(end_time=self._ns(max(end, start)))

        phase("queue.wait", t.enqueued, t.dispatched, base)
        fetch = {"loraserve.adapter.fetch_bytes": t.fetch_bytes,
                 "loraserve.adapter.fetch_ms": t.fetch_ms} if t.fetch_bytes else {}
        phase("adapter.load", t.load_started, t.load_ended, {
            **base, "loraserve.adapter.source": c.load_source.label, "loraserve.adapter.bytes": t.load_bytes,
            "loraserve.adapter.load_shared": t.load_shared, **fetch})
        model = asked if asked and asked != BASE_ADAPTER_ID else self.model_name
        served = self.model_name if c.adapter.is_base else c.adapter.key
        phase("generate", t.load_ended, t.finished, {
            **base,
            gen_ai.GEN_AI_OPERATION_NAME: TEXT_COMPLETION,
            gen_ai.GEN_AI_REQUEST_MODEL: model,
            gen_ai.GEN_AI_RESPONSE_MODEL: served,
            gen_ai.GEN_AI_REQUEST_MAX_TOKENS: req.max_new_tokens,
            gen_ai.GEN_AI_REQUEST_TEMPERATURE: req.sampling.temperature,
            gen_ai.GEN_AI_REQUEST_TOP_P: req.sampling.top_p,
            gen_ai.GEN_AI_USAGE_INPUT_TOKENS: c.input_tokens,
            gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: c.output_tokens,
            "loraserve.usage.cached_input_tokens": c.cached_tokens,
            gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: [c.finish_reason.value],
            "loraserve.adapter.load_source": c.load_source.label,
        })
        span.set_attributes({**base, gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: c.output_tokens})
        self.metrics.gen_ai_timing(TEXT_COMPLETION, model, c)
        if c.fallback_reason:
            span.set_attributes({"loraserve.fallback.from": c.fallback_from,
                                 "loraserve.fallback.reason": c.fallback_reason})

    # -- scheduler.observer.Observer ----------------------------------------------
    def batch_phase(self, phase: str, started: float, ended: float, adapter: AdapterRef,
                    request_ids: Sequence[str], steps: int) -> None:
        links = [Link(self._inflight[r]) for r in request_ids if r in self._inflight]
        span = self.tracer.start_span(
            f"batch.{phase}", start_time=self._ns(started), links=links, context=trace.set_span_in_context(
                trace.INVALID_SPAN),
            attributes={"loraserve.batch.size": len(request_ids), "loraserve.batch.steps": steps,
                        **_adapter_attrs(adapter)})
        span.end(end_time=self._ns(ended))

    def adapter_read(self, adapter: AdapterRef, ms: float) -> None:
        self.metrics.adapter_read(adapter, ms)

    def adapter_ready(self, adapter: AdapterRef, source: Tier, ms: float) -> None:
        self.metrics.adapter_ready(adapter, source, ms)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def fail(span: trace.Span, error_type: str, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, message))
    span.set_attribute(ERROR_TYPE, error_type)


def _adapter_attrs(adapter: AdapterRef) -> dict:
    return {"loraserve.adapter.id": adapter.id, "loraserve.adapter.version": adapter.version}
