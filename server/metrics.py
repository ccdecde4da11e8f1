"""Prometheus metrics: request histograms and counters observed as requests finish, cache and
queue state read from the scheduler at scrape time (so there is one set of books)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.scheduler import Scheduler
from scheduler.thrash import ThrashDetector
from scheduler.types import AdapterRef, Completion, LoadSource

log = logging.getLogger(__name__)

_LATENCY = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, thrash_limit: int = 10):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes: the soak's flat-memory check
        self.load_seconds = Histogram("loraserve_adapter_load_seconds", "Time to make an adapter usable for a "
                                      "batch, by where it was found", ["source"], buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram("loraserve_queue_wait_seconds", "Time from arrival to batch start",
                                       buckets=_LATENCY, registry=r)
        self.ttft_seconds = Histogram("loraserve_time_to_first_token_seconds", "Arrival to first generated token",
                                      buckets=_LATENCY, registry=r)
        self.generation_seconds = Histogram("loraserve_generation_seconds", "Prefill plus decode time",
                                            buckets=_LATENCY, registry=r)
        self.request_seconds = Histogram("loraserve_request_duration_seconds", "Whole request, as the server saw it",
                                         buckets=_LATENCY, registry=r)
        self.requests = Counter("loraserve_requests", "Requests by adapter served and status", ["adapter", "status"],
                                registry=r)
        self.cold_starts = Counter("loraserve_cold_starts", "Adapter reads from disk", registry=r)
        self.thrash = Counter("loraserve_adapter_thrash_warnings", "Adapters reloaded more than the limit within "
                              "an hour", ["adapter"], registry=r)
        self._thrash = ThrashDetector(thrash_limit)
        self._server = None

    def watch(self, scheduler: Scheduler, stack_bytes: Callable[[], int] | None = None) -> None:
        self.registry.register(_SchedulerCollector(scheduler))
        if stack_bytes is not None:
            Gauge("loraserve_adapter_stack_bytes", "Device bytes of the adapter slot stacks, reserved at start-up "
                  "(max_loras + 1 slots at max_lora_rank): the VRAM tier counts whole slots of it",
                  registry=self.registry).set_function(stack_bytes)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the port (0 picks a free one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    # -- observations --------------------------------------------------------
    def request_done(self, adapter_label: str, status: str, seconds: float, c: Completion | None) -> None:
        self.requests.labels(adapter_label, status).inc()
        self.request_seconds.observe(seconds)
        if c is not None:
            t = c.timings
            self.queue_seconds.observe(t.queue_ms / 1e3)
            self.generation_seconds.observe((t.prefill_ms + t.decode_ms) / 1e3)
            self.ttft_seconds.observe(max(c.timeline.first_token - c.timeline.enqueued, 0.0))

    def adapter_read(self, adapter: AdapterRef, ms: float) -> None:
        self.cold_starts.inc()
        if self._thrash.record(adapter.id, time.monotonic()):
            self.thrash.labels(adapter.id).inc()
            log.warning("adapter %s was loaded from disk more than %d times in an hour: the cache is too small "
                        "for this traffic (raise --ram-budget-mib / --vram-budget-mib, or pin it)",
                        adapter.id, self._thrash.limit)

    def adapter_ready(self, adapter: AdapterRef, source: LoadSource, ms: float) -> None:
        if source is not LoadSource.VRAM:
            self.load_seconds.labels(source.value).observe(ms / 1e3)


class _SchedulerCollector(Collector):
    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    def collect(self) -> Iterator:
        states = self._scheduler.tiers.tier_states()
        for metric, help_text, field in (("hits", "Requests that found their adapter in the tier", "hits"),
                                         ("misses", "Requests that did not", "misses"),
                                         ("loads", "Adapters brought into the tier", "loads"),
                                         ("evictions", "Adapters pushed out of the tier", "evictions")):
            family = CounterMetricFamily(f"loraserve_cache_{metric}", help_text, labels=["tier"])
            for t, st in states.items():
                family.add_metric([t.name.lower()], getattr(st.stats, field))
            yield family
        resident = GaugeMetricFamily("loraserve_resident_adapters", "Adapters held in the tier", labels=["tier"])
        used = GaugeMetricFamily("loraserve_cache_bytes", "Bytes of adapter weights held in the tier",
                                 labels=["tier"])
        budget = GaugeMetricFamily("loraserve_cache_budget_bytes", "The tier's byte budget", labels=["tier"])
        for t, st in states.items():
            resident.add_metric([t.name.lower()], st.adapters)
            used.add_metric([t.name.lower()], st.bytes_used)
            budget.add_metric([t.name.lower()], st.budget)
        yield from (resident, used, budget)
        yield GaugeMetricFamily("loraserve_queue_depth", "Requests waiting", value=self._scheduler.queue_depth)
        yield GaugeMetricFamily("loraserve_running_requests", "Requests in the running batch",
                                value=self._scheduler.running)
