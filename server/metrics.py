"""Prometheus metrics: request histograms and counters observed as requests finish, cache, queue
and memory state read at scrape time from what holds it (so there is one set of books).

Per-adapter and per-client labels go through BoundedLabels (server/labels.py): at most
--metrics-adapter-labels adapters and --metrics-client-labels clients get their own value, the
rest share "_other"; "-" means none (a call refused before its adapter was resolved).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraserve.scheduler.scheduler import Scheduler
from loraserve.scheduler.thrash import ThrashDetector
from loraserve.scheduler.types import AdapterRef, Completion, Tier
from loraserve.server.labels import BoundedLabels
from loraserve.server.memory import EngineMemory

log = logging.getLogger(__name__)

_LATENCY = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
# The buckets OpenTelemetry's GenAI semantic conventions advise for these two histograms.
_TTFT = (.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10)
_TPOT = (.01, .025, .05, .075, .1, .15, .2, .3, .4, .5, .75, 1, 2.5)
NONE = "-"


class Metrics:
    def __init__(self, thrash_limit: int = 10, adapter_labels: int = 50, client_labels: int = 50):
        self._adapter_label = BoundedLabels(adapter_labels)
        self._client_label = BoundedLabels(client_labels)
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes: the soak's flat-memory check

        def histogram(name: str, help_text: str, labels=("adapter",)) -> Histogram:
            return Histogram(name, help_text, labels, buckets=_LATENCY, registry=r)

        self.load_seconds = histogram("loraserve_adapter_load_seconds", "Time to make an adapter usable for a "
                                      "batch, by where it was found", ("adapter", "source"))
        self.queue_seconds = histogram("loraserve_queue_wait_seconds", "Time from arrival to batch start")
        self.ttft_seconds = histogram("loraserve_time_to_first_token_seconds", "Arrival to first generated token")
        self.generation_seconds = histogram("loraserve_generation_seconds", "Prefill plus decode time")
        self.request_seconds = histogram("loraserve_request_duration_seconds", "Whole request, as the server saw it")
        # Named as an OpenTelemetry Prometheus exporter names gen_ai.server.time_to_first_token and
        # gen_ai.server.time_per_output_token (dots to underscores, the unit added), labelled with
        # their attributes gen_ai.operation.name and gen_ai.request.model (bounded as `adapter` is).
        gen_ai_labels = ("gen_ai_operation_name", "gen_ai_request_model")
        self.gen_ai_ttft = Histogram(_prometheus_name(gen_ai_metrics.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN),
                                     "Time to generate the first token (GenAI semantic conventions)", gen_ai_labels,
                                     buckets=_TTFT, registry=r)
        self.gen_ai_tpot = Histogram(_prometheus_name(gen_ai_metrics.GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN),
                                     "Time per output token after the first (GenAI semantic conventions)",
                                     gen_ai_labels, buckets=_TPOT, registry=r)
        self.requests = Counter("loraserve_requests", "Requests by adapter served and status (OK or the error's "
                                "reason)", ["adapter", "status"], registry=r)
        self.hits = Counter("loraserve_adapter_cache_hits", "Served requests whose adapter was found in the tier",
                            ["adapter", "tier"], registry=r)
        self.misses = Counter("loraserve_adapter_cache_misses", "Served requests whose adapter was not in the tier",
                              ["adapter", "tier"], registry=r)
        self.tokens = Counter("loraserve_tokens", "Tokens of served requests: prompt (input) and generated "
                              "(output)", ["client", "adapter", "direction"], registry=r)
        self.device_seconds = Counter("loraserve_device_seconds", "Served requests' shares of the engine's "
                                      "steps", ["client", "adapter", "phase"], registry=r)
        self.load_share_seconds = Counter("loraserve_adapter_load_share_seconds", "Served requests' shares of "
                                          "the adapter loads made for them", ["client", "adapter"], registry=r)
        self.canary_requests = Counter(
            "loraserve_canary_requests", "Requests a running canary routed, by adapter, version, side (canary or "
            "stable) and outcome (ok, or error: the version's fault)", ["adapter", "version", "side", "outcome"],
            registry=r)
        self.canary_aborts = Counter("loraserve_canary_aborts", "Canaries the server aborted automatically",
                                     ["adapter"], registry=r)
        self.shadow_requests = Counter(
            "loraserve_shadow_requests", "Shadow requests by adapter, shadow version and outcome: match or differ "
            "(its answer against the served one), skipped (no spare capacity), shed (gave way to real traffic), "
            "error", ["adapter", "version", "outcome"], registry=r)
        self.shadow_agreement = Histogram(
            "loraserve_shadow_token_agreement", "Share of token positions where a shadow's answer agrees with the "
            "served one", ["adapter", "version"], buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0), registry=r)
        self.shadow_tokens = Counter("loraserve_shadow_output_tokens", "Tokens the shadow versions generated",
                                     ["adapter", "version"], registry=r)
        self.shadow_seconds = histogram("loraserve_shadow_seconds", "A shadow request's arrival to its last token",
                                        ("adapter", "version"))
        self.cold_starts = Counter("loraserve_cold_starts", "Adapter reads from disk", registry=r)
        self.thrash = Counter("loraserve_adapter_thrash_warnings", "Adapters reloaded more than the limit within "
                              "an hour", ["adapter"], registry=r)
        self._thrash = ThrashDetector(thrash_limit)
        Gauge("loraserve_adapters_thrashing", "Adapters read from disk more than --thrash-limit times in the last "
              "hour", registry=r).set_function(lambda: self._thrash.over_limit(time.monotonic()))
        self._server = None

    def watch(self, scheduler: Scheduler, memory: EngineMemory | None, lora_slots: int) -> None:
        self.registry.register(_SchedulerCollector(scheduler, memory, lora_slots))

    def watch_index(self, reload_errors: Callable[[], int]) -> None:
        """The adapter registry's count of refused indexes (server.adapters keeps the books)."""
        self.registry.register(_IndexCollector(reload_errors))

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the port (0 picks a free one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def _adapter(self, adapter_id: str) -> str:
        return adapter_id if adapter_id == NONE else self._adapter_label(adapter_id)

    # -- observations --------------------------------------------------------
    def request_done(self, adapter_id: str, status: str, seconds: float, c: Completion | None,
                     client: str = NONE) -> None:
        adapter = self._adapter(adapter_id)
        self.requests.labels(adapter, status).inc()
        self.request_seconds.labels(adapter).observe(seconds)
        if c is None:
            return
        t, cost = c.timings, c.cost
        self.queue_seconds.labels(adapter).observe(t.queue_ms / 1e3)
        self.generation_seconds.labels(adapter).observe((t.prefill_ms + t.decode_ms) / 1e3)
        self.ttft_seconds.labels(adapter).observe(max(c.timeline.first_token - c.timeline.enqueued, 0.0))
        if not c.adapter.is_base:  # as the tiers count: the base model is no cache entry
            vram_hit, ram_hit = c.load_source is Tier.VRAM, c.load_source is Tier.RAM
            (self.hits if vram_hit else self.misses).labels(adapter, "vram").inc()
            if not vram_hit:
                (self.hits if ram_hit else self.misses).labels(adapter, "ram").inc()
        who = client if client == NONE else self._client_label(client)
        self.tokens.labels(who, adapter, "input").inc(c.input_tokens)
        self.tokens.labels(who, adapter, "output").inc(c.output_tokens)
        self.device_seconds.labels(who, adapter, "prefill").inc(cost.prefill_device_ms / 1e3)
        self.device_seconds.labels(who, adapter, "decode").inc(cost.decode_device_ms / 1e3)
        self.load_share_seconds.labels(who, adapter).inc(cost.adapter_load_ms / 1e3)

    def gen_ai_timing(self, operation: str, model: str, c: Completion) -> None:
        """`model`: gen_ai.request.model, the adapter asked for. Time per output token counts the
        decode after the first token, so it needs two tokens."""
        t, labels = c.timeline, (operation, self._adapter(model))
        self.gen_ai_ttft.labels(*labels).observe(max(t.first_token - t.enqueued, 0.0))
        if c.output_tokens > 1:
            self.gen_ai_tpot.labels(*labels).observe(max(t.finished - t.first_token, 0.0) / (c.output_tokens - 1))

    def canary_request(self, name: str, version: str, side: str, error: bool) -> None:
        """Versions are labelled only here, for adapters with a running canary: a few series each."""
        self.canary_requests.labels(self._adapter(name), version, side, "error" if error else "ok").inc()

    def canary_aborted(self, name: str) -> None:
        self.canary_aborts.labels(self._adapter(name)).inc()

    def shadow_outcome(self, name: str, version: str, outcome: str) -> None:
        self.shadow_requests.labels(self._adapter(name), version, outcome).inc()

    def shadow_done(self, name: str, version: str, same: bool, agreement: float, tokens: int, seconds: float) -> None:
        adapter = self._adapter(name)
        self.shadow_requests.labels(adapter, version, "match" if same else "differ").inc()
        self.shadow_agreement.labels(adapter, version).observe(agreement)
        self.shadow_tokens.labels(adapter, version).inc(tokens)
        self.shadow_seconds.labels(adapter, version).observe(seconds)

    def adapter_read(self, adapter: AdapterRef, ms: float) -> None:
        self.cold_starts.inc()
        if self._thrash.record(adapter.id, time.monotonic()):
            self.thrash.labels(self._adapter(adapter.id)).inc()
            log.warning("adapter %s was loaded from disk more than %d times in an hour: the cache is too small "
                        "for this traffic (raise --ram-budget-mib / --vram-budget-mib, or pin it)",
                        adapter.id, self._thrash.limit)

    def adapter_ready(self, adapter: AdapterRef, source: Tier, ms: float) -> None:
        if source is not Tier.VRAM:
            self.load_seconds.labels(self._adapter(adapter.id), source.label).observe(ms / 1e3)


class _IndexCollector(Collector):
    def __init__(self, reload_errors: Callable[[], int]):
        self._reload_errors = reload_errors

    def collect(self) -> Iterator:
        yield CounterMetricFamily("loraserve_registry_reload_errors", "Registry indexes refused because they did "
                                  "not validate (each distinct one once); the last valid index kept serving",
                                  value=self._reload_errors())


class _SchedulerCollector(Collector):
    def __init__(self, scheduler: Scheduler, memory: EngineMemory | None, lora_slots: int):
        self._scheduler = scheduler
        self._memory = memory
        self._lora_slots = lora_slots

    def collect(self) -> Iterator:
        states = self._scheduler.tiers.tier_states()
        for metric, help_text, field in (("hits", "Requests that found their adapter in the tier", "hits"),
                                         ("misses", "Requests that did not", "misses"),
                                         ("loads", "Adapters brought into the tier", "loads"),
                                         ("evictions", "Adapters pushed out of the tier", "evictions")):
            family = CounterMetricFamily(f"loraserve_cache_{metric}", help_text, labels=["tier"])
            for t, st in states.items():
                family.add_metric([t.label], getattr(st.stats, field))
            yield family
        resident = GaugeMetricFamily("loraserve_resident_adapters", "Adapters held in the tier", labels=["tier"])
        used = GaugeMetricFamily("loraserve_cache_bytes", "Bytes of adapter weights held in the tier",
                                 labels=["tier"])
        budget = GaugeMetricFamily("loraserve_cache_budget_bytes", "The tier's byte budget", labels=["tier"])
        for t, st in states.items():
            resident.add_metric([t.label], st.adapters)
            used.add_metric([t.label], st.bytes_used)
            budget.add_metric([t.label], st.budget)
        yield from (resident, used, budget)
        sched = self._scheduler
        yield GaugeMetricFamily("loraserve_queue_depth", "Requests waiting", value=sched.queue_depth)
        yield GaugeMetricFamily("loraserve_queue_limit", "Most requests waiting (--max-queue)",
                                value=sched.queue_limit)
        yield GaugeMetricFamily("loraserve_running_requests", "Requests in the running batch", value=sched.running)
        kv = sched.kv_blocks
        total, used = kv.total, kv.used
        yield GaugeMetricFamily("loraserve_kv_blocks", "Blocks in the KV pool (--kv-block-size token positions "
                                "each)", value=total)
        yield GaugeMetricFamily("loraserve_kv_blocks_used", "KV pool blocks held by running requests",
                                value=used)
        yield GaugeMetricFamily("loraserve_kv_cache_usage_ratio", "Share of the KV pool's blocks held by running "
                                "requests (0 to 1)", value=used / total if total else 0.0)
        yield GaugeMetricFamily("loraserve_kv_blocks_cached", "Free KV pool blocks still holding a shareable "
                                "prompt prefix", value=kv.cached)
        yield GaugeMetricFamily("loraserve_kv_tokens_held", "Tokens (prompt plus generated) the running requests "
                                "hold in the KV pool", value=sched.kv_tokens_held)
        yield CounterMetricFamily("loraserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
                                  "prefix cache at admission", value=kv.prefix.queried_tokens)
        yield CounterMetricFamily("loraserve_prefix_cache_hit_tokens", "Prompt tokens whose keys were taken "
                                  "from shared prefix blocks instead of computed", value=kv.prefix.hit_tokens)
        yield CounterMetricFamily("loraserve_preemptions", "Running requests sent back to the queue (their KV "
                                  "blocks freed) so that others could grow", value=sched.stats.preemptions)
        yield from _holdings(sched, self._lora_slots)
        if self._memory is not None:
            yield from _memory(self._memory, states[Tier.RAM].bytes_used, used / total if total else 0.0)


def _holdings(scheduler: Scheduler, lora_slots: int) -> Iterator:
    """Which adapters this replica holds, for an adapter-aware router (docs/operations.md "Kubernetes").

    One series per adapter in RAM or VRAM under its own name, whatever --metrics-adapter-labels
    says: a router needs the real name, and the tiers bound the count (--max-loras slots, the RAM
    budget); the rest of the store is not named. The same facts again in the label format of vLLM's
    vllm:lora_requests_info, which the Gateway API Inference Extension's endpoint picker reads
    (--lora-info-metric): attached adapters, adapters queued requests wait for, the slots; its
    value is when it was read, so the picker takes the newest series."""
    held = [s for s in scheduler.tiers.adapter_states() if s.tier >= Tier.RAM]
    resident = GaugeMetricFamily("loraserve_adapter_resident", "1 for each adapter version held in the tier "
                                 "(RAM: read, VRAM: attached)", labels=["adapter", "version", "tier"])
    for s in held:
        resident.add_metric([s.adapter.id, s.adapter.version, s.tier.label], 1)
    yield resident
    attached = sorted({s.adapter.id for s in held if s.tier is Tier.VRAM})
    waiting = sorted({a.id for a in scheduler.waiting_adapters if not a.is_base} - set(attached))
    info = GaugeMetricFamily("loraserve_lora_requests_info", "Attached adapters (running_lora_adapters), adapters "
                             "queued requests wait for (waiting_lora_adapters) and adapter slots (max_lora), as "
                             "vllm:lora_requests_info has them; the value is the time read",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    info.add_metric([str(lora_slots), ",".join(attached), ",".join(waiting)], time.time())
    yield info


def _memory(memory: EngineMemory, ram_tier: int, kv_used: float) -> Iterator:
    device, kv = memory.device, memory.kv_bytes()
    parts = GaugeMetricFamily("loraserve_memory_bytes", "Memory by device and part: base_weights, kv_pool "
                              "(reserved whole at start-up), adapter_slots (the slot stacks, likewise) and "
                              "adapter_ram (the RAM tier's adapters)", labels=["device", "component"])
    for where, held in memory.weights.items():
        parts.add_metric([where, "base_weights"], held)
    parts.add_metric([device, "kv_pool"], kv)
    parts.add_metric([device, "adapter_slots"], memory.stack_bytes())
    parts.add_metric(["cpu", "adapter_ram"], ram_tier)
    yield parts
    used = GaugeMetricFamily("loraserve_kv_pool_used_bytes", "KV pool bytes in blocks held by running requests",
                             labels=["device"])
    used.add_metric([device], kv * kv_used)
    yield used


def _prometheus_name(otel_name: str) -> str:
    return otel_name.replace(".", "_") + "_seconds"
