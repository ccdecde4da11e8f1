"""Serving from a remote store (s3://): fetches into the disk cache for the tiers (as their
scheduler.tiers.Origin), the index poll, and their metrics.

A fetch runs on a thread (boto3 is synchronous) inside the read it belongs to, so it holds one
of the `--max-concurrent-loads` slots and is single-flight per adapter (scheduler.loads). Its
failures become typed errors here: the origin's own error goes into ErrorInfo metadata.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraserve.registry.diskcache import DiskCache, DiskCacheFull
from loraserve.registry.s3 import HashMismatch, OriginError
from loraserve.registry.store import Store
from loraserve.scheduler.errors import AdapterIncompatible, AdapterLoadFailed, OriginFetchFailed
from loraserve.scheduler.tiers import Fetch
from loraserve.scheduler.types import AdapterRef
from loraserve.server.adapters import AdapterRegistry

log = logging.getLogger(__name__)

_SECONDS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)


class OriginMetrics:
    """Remote fetches, retries, index polls and the disk cache, on the server's metrics registry."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.fetches = Counter("loraserve_origin_fetches", "Adapter downloads from the remote origin, by result "
                               "(downloaded, failed)", ["result"], registry=r)
        self.fetch_bytes = Counter("loraserve_origin_fetch_bytes", "Bytes downloaded from the remote origin",
                                   registry=r)
        self.fetch_seconds = Histogram("loraserve_origin_fetch_seconds", "Time of one adapter's download into "
                                       "the disk cache, retries included", buckets=_SECONDS, registry=r)
        self.retries = Counter("loraserve_origin_retries", "Origin calls retried, by the error that caused it",
                               ["code"], registry=r)
        self.errors = Counter("loraserve_origin_errors", "Fetches that failed for good, by the origin's error",
                              ["code"], registry=r)
        self.index_reloads = Counter("loraserve_index_reloads", "Times a changed registry index was applied",
                                     registry=r)
        self.index_poll_failures = Counter("loraserve_index_poll_failures", "Index polls that failed (the "
                                           "last index read keeps serving)", registry=r)
        self._registry = r

    def watch(self, cache: DiskCache) -> None:
        self._registry.register(_DiskCacheCollector(cache))

    def retried(self, err: OriginError) -> None:
        self.retries.labels(err.code).inc()


class _DiskCacheCollector(Collector):
    def __init__(self, cache: DiskCache):
        self._cache = cache

    def collect(self) -> Iterator:
        c = self._cache
        yield GaugeMetricFamily("loraserve_disk_cache_bytes", "Bytes of adapter copies in the disk cache "
                                "(downloads under way included)", value=c.used)
        yield GaugeMetricFamily("loraserve_disk_cache_budget_bytes", "The disk cache's byte budget", value=c.budget)
        yield GaugeMetricFamily("loraserve_disk_cache_adapters", "Adapter versions in the disk cache", value=len(c))
        for field, help_text in (("hits", "Reads that found their copy on disk"),
                                 ("misses", "Reads that had to download it"),
                                 ("evictions", "Copies evicted to make room"),
                                 ("discarded", "Downloads thrown away (failed, stalled, corrupt)")):
            yield CounterMetricFamily(f"loraserve_disk_cache_{field}", help_text, value=getattr(c.stats, field))


class RemoteOrigin:
    """loraserve.scheduler.tiers.Origin over a bucket's Store and its DiskCache."""

    def __init__(self, store: Store, cache: DiskCache, metrics: OriginMetrics, wait_s: float):
        self.store, self.cache, self.metrics = store, cache, metrics
        self._wait_s = wait_s
        metrics.watch(cache)

    @asynccontextmanager
    async def local(self, adapter: AdapterRef) -> AsyncIterator[Fetch | None]:
        name, version = adapter.id, adapter.version
        try:
            fetched = await asyncio.to_thread(self.store.materialize, self.cache, name, version, adapter.sha256,
                                              self._wait_s)
        except HashMismatch as exc:
            self._failed(exc)
            err = AdapterIncompatible(adapter.key, f"its weights in {self.store.url} do not match the sha256 in its "
                                      "passport; the download was discarded", reason="WEIGHTS_HASH_MISMATCH")
            err.metadata.update(origin=self.store.url, origin_error=str(exc), origin_code=exc.code)
            raise err from exc
        except DiskCacheFull as exc:
            raise AdapterLoadFailed(adapter.key, str(exc)) from exc
        except OriginError as exc:
            self._failed(exc)
            log.warning("fetching adapter %s@%s from %s failed: %s", name, version, self.store.url, exc)
            raise OriginFetchFailed(adapter.key, self.store.url, str(exc), exc.code) from exc
        except Exception as exc:  # the disk cache's own I/O: still only this adapter's requests fail
            log.exception("fetching adapter %s@%s into the disk cache failed", name, version)
            raise AdapterLoadFailed(adapter.key, f"{type(exc).__name__}: {exc}") from exc
        if fetched.downloaded:
            self.metrics.fetches.labels("downloaded").inc()
            self.metrics.fetch_bytes.inc(fetched.bytes)
            self.metrics.fetch_seconds.observe(fetched.seconds)
            log.info("fetched adapter %s@%s from %s: %d bytes in %.3fs", name, version, self.store.url,
                     fetched.bytes, fetched.seconds)
        try:
            yield fetched if fetched.downloaded else None
        finally:
            self.cache.release(name, version)

    def _failed(self, exc: OriginError) -> None:
        self.metrics.fetches.labels("failed").inc()
        self.metrics.errors.labels(exc.code).inc()


async def poll_index(registry: AdapterRegistry, metrics: OriginMetrics) -> None:
    """One poll of the remote index's ETag; a changed index that validates is applied (promotions,
    rollbacks, new versions). A failed poll keeps serving the last index read."""
    try:
        if await asyncio.to_thread(registry.poll):
            metrics.index_reloads.inc()
            log.info("registry index changed in %s; applied", registry.store.url)
    except Exception as exc:  # noqa: BLE001 - an outage must not stop the poll
        metrics.index_poll_failures.inc()
        log.warning("polling the registry index in %s failed (serving the last one read): %s",
                    registry.store.url, exc)
