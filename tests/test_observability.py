"""Traces (span tree, attributes, links, OTLP export) and Prometheus metrics, from a real server."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import generate_latest

from conftest import PROMPT, ServerThread, room_for_one_in_ram, server_config
from loraserve.v1 import admin_pb2, admin_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.scheduler.thrash import ThrashDetector
from loraserve.scheduler.types import AdapterRef, Completion, FinishReason, Tier
from loraserve.server.labels import OTHER, BoundedLabels
from loraserve.server.metrics import Metrics
from loraserve.server.telemetry import provider_from_env
from test_lifecycle import wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
GENERATE = "loraserve.v1.InferenceService/Generate"


@pytest.fixture(scope="module")
def traced(demo_dir):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    srv = ServerThread(room_for_one_in_ram(demo_dir, thrash_limit=1, max_loras=1), tracer_provider=provider)
    with srv.channel() as ch:
        yield srv, exporter, inference_pb2_grpc.InferenceServiceStub(ch)
    srv.stop()


def ask(stub, adapter, traceparent=None, **kw):
    metadata = (("traceparent", traceparent),) if traceparent else ()
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=6, **kw),
                         metadata=metadata, timeout=60)


def tree(exporter, request_id):
    spans = exporter.get_finished_spans()
    rpc = next(s for s in spans if s.name == GENERATE and s.attributes.get("loraserve.request_id") == request_id)
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == rpc.context.span_id}
    return rpc, children, spans


def test_span_tree_for_a_cold_then_a_warm_request(traced):
    srv, exporter, stub = traced
    exporter.clear()
    ask(stub, "support", traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01", request_id="cold")
    ask(stub, "support", request_id="warm")
    for request_id, source in (("cold", "disk"), ("warm", "vram")):
        rpc, children, spans = tree(exporter, request_id)
        assert rpc.kind is SpanKind.SERVER and rpc.attributes["rpc.system"] == "grpc"
        assert set(children) == {"adapter.resolve", "queue.wait", "adapter.load", "generate"}
        load, gen = children["adapter.load"], children["generate"]
        assert load.attributes["loraserve.adapter.id"] == "support"
        assert load.attributes["loraserve.adapter.version"] == "1"
        assert load.attributes["loraserve.adapter.source"] == source
        assert load.attributes["loraserve.adapter.bytes"] > 0
        assert load.attributes["loraserve.adapter.load_shared"] is False
        assert gen.attributes["gen_ai.operation.name"] == "text_completion"
        assert gen.attributes[gen_ai.GEN_AI_REQUEST_MODEL] == "support"  # the adapter asked for
        assert gen.attributes[gen_ai.GEN_AI_RESPONSE_MODEL] == "support@1"  # the version that served
        assert gen.attributes["gen_ai.request.max_tokens"] == 6
        assert gen.attributes["gen_ai.usage.output_tokens"] == 6 and gen.attributes["gen_ai.usage.input_tokens"] > 0
        assert 0 <= gen.attributes["loraserve.usage.cached_input_tokens"] < gen.attributes["gen_ai.usage.input_tokens"]
        assert list(gen.attributes["gen_ai.response.finish_reasons"]) == ["length"]
        assert children["queue.wait"].start_time <= load.end_time <= gen.start_time + 1 <= gen.end_time + 1
        # Batch spans are their own traces, linked to every request they served.
        batch = [s for s in spans if s.name in ("batch.prefill", "batch.decode")
                 and any(link.context.span_id == rpc.context.span_id for link in s.links)]
        assert {s.name for s in batch} == {"batch.prefill", "batch.decode"}
    cold, _, _ = tree(exporter, "cold")
    warm, _, _ = tree(exporter, "warm")
    assert format(cold.context.trace_id, "032x") == TRACE_ID and format(cold.parent.span_id, "016x") == PARENT_ID
    assert cold.parent.is_remote and warm.parent is None
    cold_load = tree(exporter, "cold")[1]["adapter.load"]
    assert cold_load.end_time - cold_load.start_time > 0


def test_a_base_model_request_names_the_base_model_in_its_gen_ai_attributes(traced):
    srv, exporter, stub = traced
    exporter.clear()
    ask(stub, "base", request_id="plain")
    gen = tree(exporter, "plain")[1]["generate"]
    model = srv.server.registry.base.model_id
    assert (gen.attributes[gen_ai.GEN_AI_REQUEST_MODEL], gen.attributes[gen_ai.GEN_AI_RESPONSE_MODEL]) == (model, model)


def test_errors_set_span_status_and_error_type(traced):
    _, exporter, stub = traced
    exporter.clear()
    with pytest.raises(grpc.RpcError):
        ask(stub, "ghost")
    rpc = next(s for s in exporter.get_finished_spans() if s.name == GENERATE)
    assert rpc.status.status_code is StatusCode.ERROR and rpc.attributes["error.type"] == "ADAPTER_NOT_FOUND"


def scrape(srv) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in body.splitlines() if line and not line.startswith("#")}


def total(sample: dict[str, float], name: str, **labels) -> float:
    """Sum of `name`'s series whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in sample.items()
               if k.split("{")[0] == name and all(w in k.partition("{")[2].rstrip("}").split(",") for w in want))


def test_metrics_endpoint_counters_move(traced):
    srv, _, stub = traced
    before = scrape(srv)
    answers = [ask(stub, "legal"), ask(stub, "legal")]
    with pytest.raises(grpc.RpcError):
        ask(stub, "ghost")
    after = scrape(srv)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("loraserve_requests_total", adapter="legal", status="OK") == 2
    assert delta("loraserve_requests_total", adapter="-", status="ADAPTER_NOT_FOUND") == 1
    assert delta("loraserve_request_duration_seconds_count") == 3
    assert delta("loraserve_request_duration_seconds_count", adapter="-") == 1
    for histogram in ("queue_wait", "time_to_first_token", "generation", "request_duration"):
        assert delta(f"loraserve_{histogram}_seconds_count", adapter="legal") == 2, histogram
    for histogram in ("time_to_first_token", "time_per_output_token"):  # GenAI semantic conventions' names
        assert delta(f"gen_ai_server_{histogram}_seconds_count", gen_ai_operation_name="text_completion",
                     gen_ai_request_model="legal") == 2, histogram
    assert delta("loraserve_cache_hits_total", tier="vram") + delta("loraserve_cache_misses_total", tier="vram") == 2
    assert (delta("loraserve_adapter_cache_hits_total", adapter="legal", tier="vram")
            + delta("loraserve_adapter_cache_misses_total", adapter="legal", tier="vram")) == 2
    # Cost, by client and adapter: exactly what the responses' usage says.
    client = {"client": "ipv4:127.0.0.1", "adapter": "legal"}
    assert delta("loraserve_tokens_total", direction="input", **client) == sum(a.usage.input_tokens for a in answers)
    assert delta("loraserve_tokens_total", direction="output", **client) == 12
    for phase in ("prefill", "decode"):
        used = [getattr(a.usage, f"{phase}_device_ms") for a in answers]
        assert all(u > 0 for u in used)
        assert delta("loraserve_device_seconds_total", phase=phase, **client) == pytest.approx(sum(used) / 1e3)
    assert delta("loraserve_adapter_load_share_seconds_total", **client) == pytest.approx(
        sum(a.usage.adapter_load_ms for a in answers) / 1e3)
    for gauge in ("loraserve_queue_depth", "loraserve_running_requests", 'loraserve_cache_bytes{tier="vram"}',
                  'loraserve_cache_budget_bytes{tier="ram"}', 'loraserve_resident_adapters{tier="vram"}',
                  "loraserve_queue_limit", "loraserve_kv_blocks", "loraserve_kv_blocks_used",
                  "loraserve_kv_blocks_cached", "loraserve_kv_tokens_held", "loraserve_adapters_thrashing",
                  "loraserve_prefix_cache_queried_tokens_total", "loraserve_prefix_cache_hit_tokens_total",
                  "loraserve_preemptions_total"):
        assert gauge in after
    assert after['loraserve_cache_bytes{tier="vram"}'] <= after['loraserve_cache_budget_bytes{tier="vram"}']


def test_memory_breakdown_by_device_and_part(traced):
    srv, _, _ = traced
    sample = scrape(srv)
    memory = [k for k in sample if k.startswith("loraserve_memory_bytes{")]
    parts = {c: total(sample, "loraserve_memory_bytes", device="cpu", component=c)
             for c in ("base_weights", "kv_pool", "adapter_slots", "adapter_ram")}
    assert len(memory) == len(parts)
    engine = srv.server.engine
    assert parts["base_weights"] == sum(p.numel() * p.element_size() for p in engine._model.parameters()) + sum(
        b.numel() * b.element_size() for b in engine._model.buffers())
    assert parts["kv_pool"] == engine.kv_bytes() > 0
    # The real footprint of the attached adapters is at least what the tier counts.
    assert parts["adapter_slots"] == engine.stack_bytes() >= sample['loraserve_cache_bytes{tier="vram"}'] > 0
    assert parts["adapter_ram"] == sample['loraserve_cache_bytes{tier="ram"}']
    assert sample["loraserve_kv_blocks"] == engine.kv_blocks > 0
    assert sample['loraserve_kv_pool_used_bytes{device="cpu"}'] == pytest.approx(
        parts["kv_pool"] * sample["loraserve_kv_blocks_used"] / sample["loraserve_kv_blocks"])


def test_each_response_carries_its_usage_streamed_or_not(traced):
    _, _, stub = traced
    unary = ask(stub, "medical", request_id="usage")
    last = list(stub.GenerateStream(pb.GenerateRequest(adapter_id="medical", prompt=PROMPT, max_new_tokens=6),
                                    timeout=60))[-1]
    for usage in (unary.usage, last.usage):
        assert usage.input_tokens > 0 and usage.output_tokens == 6
        assert usage.prefill_device_ms > 0 and usage.decode_device_ms > 0


def test_a_repeated_prompt_takes_its_prefix_blocks_from_the_cache_for_the_same_adapter_only(traced):
    srv, _, stub = traced
    engine = srv.server.engine
    block = engine.kv_block_size
    prompt = "Prefix cache probe. " + " ".join(f"Clause {i} applies." for i in range(30)) + "\nAnswer:"
    assert len(engine.encode(prompt)) >= 3 * block  # at least two whole blocks to share

    def generate(adapter):
        return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=prompt, max_new_tokens=4), timeout=60)

    def cache_stats():
        with srv.channel() as ch:
            return admin_pb2_grpc.AdapterAdminServiceStub(ch).GetCacheStats(admin_pb2.GetCacheStatsRequest(),
                                                                             timeout=10)

    before, stats_before = scrape(srv), cache_stats()
    first = generate("legal")
    second = generate("legal")
    other = generate("medical")  # same tokens, another adapter: its keys differ, nothing is shared
    after, stats_after = scrape(srv), cache_stats()

    cached = second.usage.cached_input_tokens
    assert first.usage.cached_input_tokens == 0
    assert 2 * block <= cached < second.usage.input_tokens and cached % block == 0
    assert other.usage.cached_input_tokens == 0
    queried = sum(r.usage.input_tokens for r in (first, second, other))
    assert stats_after.prefix_cache_hit_tokens - stats_before.prefix_cache_hit_tokens == cached > 0
    assert stats_after.prefix_cache_queried_tokens - stats_before.prefix_cache_queried_tokens == queried
    assert stats_after.kv_blocks_used == stats_after.kv_tokens_held == 0  # all finished
    assert 2 <= stats_after.kv_blocks_cached <= stats_after.kv_blocks_total
    assert (after["loraserve_prefix_cache_hit_tokens_total"]
            - before["loraserve_prefix_cache_hit_tokens_total"]) == cached
    assert (after["loraserve_prefix_cache_queried_tokens_total"]
            - before["loraserve_prefix_cache_queried_tokens_total"]) == queried
    assert after["loraserve_kv_blocks_cached"] == stats_after.kv_blocks_cached
    assert after["loraserve_preemptions_total"] == stats_after.preemptions


def test_reloading_one_adapter_again_and_again_raises_a_thrash_warning(traced):
    srv, _, stub = traced
    before = scrape(srv)
    # Room for one adapter per tier: rotating three reads each from disk every time.
    for adapter in ("legal", "medical", "support") * 2:
        ask(stub, adapter)
    after = scrape(srv)
    assert after["loraserve_cold_starts_total"] - before.get("loraserve_cold_starts_total", 0) >= 3
    assert after.get('loraserve_adapter_thrash_warnings_total{adapter="legal"}', 0) >= 1
    assert after["loraserve_adapters_thrashing"] >= 1
    assert total(after, "loraserve_adapter_load_seconds_count", source="disk") >= 3
    assert total(after, "loraserve_adapter_load_seconds_count", adapter="medical", source="disk") >= 1


def test_ten_thousand_adapters_and_clients_make_at_most_n_plus_one_label_values():
    labels = BoundedLabels(5)
    assert len({labels(f"adapter-{i}") for i in range(10_000)}) == 6
    assert labels("adapter-3") == "adapter-3" and labels("adapter-5") == OTHER  # given for life, never moved
    metrics = Metrics(thrash_limit=1, adapter_labels=5, client_labels=3)
    for i in range(10_000):
        adapter = AdapterRef(f"a{i}", "1", "/store")
        metrics.adapter_read(adapter, 1.0)
        metrics.adapter_read(adapter, 1.0)  # a thrash warning, labelled too
        metrics.adapter_ready(adapter, Tier.DISK, 1.0)
        metrics.request_done(adapter.id, "OK", 0.01, Completion(f"r{i}", "x", FinishReason.LENGTH, 3, 1, adapter,
                                                               Tier.DISK), client=f"ipv4:10.0.{i % 250}.1")
    exposition = generate_latest(metrics.registry).decode()
    assert len(set(re.findall(r'adapter="([^"]*)"', exposition))) == 6
    assert len(set(re.findall(r'client="([^"]*)"', exposition))) == 4
    assert 'loraserve_adapter_thrash_warnings_total{adapter="_other"} 9995.0' in exposition


def test_thrash_detector_counts_within_the_window():
    d = ThrashDetector(limit=2, window_s=10)
    assert [d.record("a", t) for t in (0, 1, 2, 20, 21)] == [False, False, True, False, False]
    for t in (22, 23, 24):
        d.record("b", t)
    assert d.over_limit(24) == 1 and d.over_limit(40) == 0


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def from_env(monkeypatch, **env: str):
    """provider_from_env() with exactly these OTEL_* variables set (the SDK reads os.environ)."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return provider_from_env()


def test_real_otlp_exporter_delivers_spans_to_a_receiver(demo_dir, monkeypatch):
    receiver = _Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    provider = from_env(monkeypatch, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
                        OTEL_SERVICE_NAME="loraserve-otlp-test")
    srv = ServerThread(server_config(demo_dir), tracer_provider=provider)
    try:
        with srv.channel() as ch:
            ask(inference_pb2_grpc.InferenceServiceStub(ch), "medical")
    finally:
        srv.stop()  # flushes the exporter
        collector.stop(0)
    resource_spans = [rs for r in receiver.requests for rs in r.resource_spans]
    services = {a.value.string_value for rs in resource_spans for a in rs.resource.attributes
                if a.key == "service.name"}
    names = {s.name for rs in resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert services == {"loraserve-otlp-test"}
    assert {GENERATE, "adapter.resolve", "queue.wait", "adapter.load", "generate", "batch.prefill"} <= names


def test_tracing_is_off_unless_configured(monkeypatch):
    assert from_env(monkeypatch) is None
    assert from_env(monkeypatch, OTEL_TRACES_EXPORTER="none", OTEL_EXPORTER_OTLP_ENDPOINT="http://x:4317") is None
    assert from_env(monkeypatch, OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="console") is None
    assert from_env(monkeypatch, OTEL_TRACES_EXPORTER="console") is not None
    with pytest.raises(ValueError, match="zipkin"):
        from_env(monkeypatch, OTEL_TRACES_EXPORTER="zipkin")


def test_the_sdk_reads_the_resource_and_sampler_from_the_environment(monkeypatch):
    provider = from_env(monkeypatch, OTEL_TRACES_EXPORTER="console", OTEL_TRACES_SAMPLER="traceidratio",
                        OTEL_TRACES_SAMPLER_ARG="0.25", OTEL_RESOURCE_ATTRIBUTES="deployment.environment=canary")
    assert provider.resource.attributes["service.name"] == "loraserve"  # the server's default
    assert provider.resource.attributes["deployment.environment"] == "canary"
    assert provider.sampler.rate == 0.25
    named = from_env(monkeypatch, OTEL_TRACES_EXPORTER="console", OTEL_RESOURCE_ATTRIBUTES="service.name=edge")
    assert named.resource.attributes["service.name"] == "edge"


def test_metrics_name_the_adapters_this_replica_holds_and_waits_for(traced):
    """What an adapter-aware router reads: each held adapter under its own name, and the same in
    the Gateway API Inference Extension's LoRA info format (docs/operations.md "Kubernetes")."""
    srv, _, stub = traced  # one adapter slot, RAM room for one adapter

    def info(sample):
        [(key, value)] = [(k, v) for k, v in sample.items() if k.startswith("loraserve_lora_requests_info{")]
        return dict(re.findall(r'(\w+)="([^"]*)"', key)), value

    long = pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=450, ignore_eos=True)
    busy = stub.Generate.future(long, timeout=60)
    assert wait_for(lambda: srv.server.scheduler.running == 1)
    queued = stub.Generate.future(pb.GenerateRequest(adapter_id="medical", prompt=PROMPT, max_new_tokens=4),
                                  timeout=60)  # its adapter needs the slot legal holds
    seen = {}

    def medical_waits() -> bool:  # asserted on the scrape that saw it: a second one may see it admitted
        seen["info"] = info(scrape(srv))
        return seen["info"][0]["waiting_lora_adapters"] == "medical"

    assert wait_for(medical_waits, 10)
    labels, read_at = seen["info"]
    assert labels == {"max_lora": "1", "running_lora_adapters": "legal", "waiting_lora_adapters": "medical"}
    assert abs(read_at - time.time()) < 5
    busy.result(), queued.result()

    sample = scrape(srv)
    held = {(s.adapter.id, s.adapter.version, s.tier.label) for s in srv.server.scheduler.tiers.adapter_states()
            if s.tier >= Tier.RAM}
    resident = {(labels["adapter"], labels["version"], labels["tier"]): v for k, v in sample.items()
                if k.startswith("loraserve_adapter_resident{") and (labels := dict(re.findall(r'(\w+)="([^"]*)"', k)))}
    assert set(resident) == held and set(resident.values()) == {1.0} and ("medical", "1", "vram") in held
    assert info(sample)[0] == {"max_lora": "1", "running_lora_adapters": "medical", "waiting_lora_adapters": ""}
    assert sample["loraserve_kv_cache_usage_ratio"] == pytest.approx(
        sample["loraserve_kv_blocks_used"] / sample["loraserve_kv_blocks"])
