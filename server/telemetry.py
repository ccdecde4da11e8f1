"""OpenTelemetry tracing: one server span per RPC (a child of the caller's `traceparent`), child
spans per phase, and one span per batch phase linked to every request it served.

Configured by the standard variables: OTEL_TRACES_EXPORTER (otlp, console, none; comma list),
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_SERVICE_NAME,
OTEL_TRACES_SAMPLER(_ARG), OTEL_SDK_DISABLED. With no exporter and no endpoint set, tracing is off.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Mapping, Sequence

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from scheduler.types import AdapterRef, Completion, GenerationRequest, Tier
from server.metrics import Metrics


def provider_from_env(env: Mapping[str, str] = os.environ) -> TracerProvider | None:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporters = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "otlp" if endpoint else "none").split(",")]
    exporters = [e for e in exporters if e and e != "none"]
    if not exporters:
        return None
    # The SDK reads OTEL_TRACES_SAMPLER and OTEL_RESOURCE_ATTRIBUTES itself.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME", "loraserve")}))
    for name in exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            # Jaeger and collectors take OTLP/gRPC on 4317; an http:// endpoint means plaintext.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        elif name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER {name!r} is not one of otlp, console, none")
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
        sets its status (`fail`)."""
        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        service, _, name = method.rpartition("/")
        span = self.tracer.start_span(method, context=propagate.extract(carrier), kind=SpanKind.SERVER,
                                      attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
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

    def finished(self, span: trace.Span, req: GenerationRequest | None, c: Completion | None) -> None:
        """Phase spans from the completion's timeline, as children of the RPC span."""
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
        phase("generate", t.load_ended, t.finished, {
            **base,
            "gen_ai.operation.name": "text_completion",
            "gen_ai.request.model": self.model_name,
            "gen_ai.request.max_tokens": req.max_new_tokens,
            "gen_ai.request.temperature": req.sampling.temperature,
            "gen_ai.request.top_p": req.sampling.top_p,
            "gen_ai.usage.input_tokens": c.input_tokens,
            "gen_ai.usage.output_tokens": c.output_tokens,
            "loraserve.usage.cached_input_tokens": c.cached_tokens,
            "gen_ai.response.finish_reasons": [c.finish_reason.value],
            "loraserve.adapter.load_source": c.load_source.label,
        })
        span.set_attributes({**base, "gen_ai.usage.output_tokens": c.output_tokens})
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
    span.set_attribute("error.type", error_type)


def _adapter_attrs(adapter: AdapterRef) -> dict:
    return {"loraserve.adapter.id": adapter.id, "loraserve.adapter.version": adapter.version}
