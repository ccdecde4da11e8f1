"""Server assembly: gRPC server, health, reflection, model start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
from opentelemetry.sdk.trace import TracerProvider
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.runner.tokens import Tokens
from loraserve.scheduler.cache import Budgets, Tier
from loraserve.scheduler.housekeeping import sweep_idle_forever, warm_daily
from loraserve.scheduler.scheduler import Scheduler
from loraserve.server import admin, http
from loraserve.registry.identity import BaseIdentity, base_identity
from loraserve.registry.diskcache import DiskCache
from loraserve.registry.origin import open_store
from loraserve.registry.errors import StoreError
from loraserve.scheduler.errors import ShuttingDown
from loraserve.server.adapters import AdapterRegistry
from loraserve.server.auth import Authenticator
from loraserve.server.interceptors import AccessInterceptor
from loraserve.server.config import ServerConfig
from loraserve.server.convert import RequestLimits
from loraserve.server.memory import EngineMemory
from loraserve.server.metrics import Metrics
from loraserve.server.remote import OriginMetrics, RemoteOrigin, poll_index
from loraserve.server.service import InferenceServicer
from loraserve.server.telemetry import Telemetry, provider_from_env

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdapterAdminService"].full_name,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)
UNREQUESTED_S = 30
"""How long gRPC holds a call no handler has picked up before cancelling it (its default)."""
REGISTRY_HEALTH = "loraserve.registry"
"""A health service name of its own for the adapter index: NOT_SERVING while the store's current
index is refused (the server serves the last valid one; GetCacheStats says why)."""
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
CLOSE_GRACE_S = 5.0
"""At shutdown, once every request has its answer (drained, or SHUTTING_DOWN once the grace period
ends): how long handlers get to send it before the server closes. SIGTERM to exit takes up to
grace_period_s plus this (and closing the engine)."""


def engine_config(cfg: ServerConfig) -> EngineConfig:
    """The engine's part of the server's configuration, field by field from the sections that hold it."""
    model, engine, lora = cfg.model, cfg.engine, cfg.lora
    return EngineConfig(model_path=model.model_path, quantization=model.quantization, device=model.device,
                        dtype=model.dtype, load_threads=lora.max_concurrent_loads,
                        max_rows=cfg.scheduler.max_batch_size, kv_cache_mib=engine.kv_cache_mib,
                        kv_block_size=engine.kv_block_size, gpu_memory_fraction=engine.gpu_memory_fraction,
                        attention=engine.attention, max_model_len=engine.max_model_len, max_loras=lora.max_loras,
                        max_lora_rank=lora.max_lora_rank, lora_target_modules=lora.lora_target_modules,
                        vram_budget_bytes=lora.vram_budget_bytes, prefill_chunk_tokens=engine.prefill_chunk_tokens,
                        decode_graphs="off" if engine.no_cuda_graphs else "auto",
                        deterministic=engine.deterministic)


class LoraServer:
    """Starts listening at once (health NOT_SERVING), then loads the model and turns SERVING."""

    def __init__(self, cfg: ServerConfig, engine: TorchEngine | None = None,
                 tracer_provider: TracerProvider | None = None):
        """`tracer_provider` defaults to one configured from the OTEL_* environment (or none)."""
        self.cfg = cfg
        self.engine = engine or TorchEngine(engine_config(cfg))
        self.scheduler: Scheduler | None = None
        self.health = health.aio.HealthServicer()
        telemetry, registry, limits = cfg.telemetry, cfg.registry, cfg.limits
        self.metrics = Metrics(thrash_limit=telemetry.thrash_limit, adapter_labels=telemetry.metrics_adapter_labels,
                               client_labels=telemetry.metrics_client_labels)
        self.origin_metrics = OriginMetrics(self.metrics.registry) if registry.remote else None
        store = open_store(registry.adapters_dir, endpoint_url=registry.s3_endpoint_url,
                           cache_dir=registry.disk_cache_dir, timeout_s=registry.origin_timeout_s,
                           retries=registry.origin_retries,
                           on_retry=self.origin_metrics and self.origin_metrics.retried)
        self.origin: RemoteOrigin | None = None
        # The base model's identity is known once load() has fingerprinted it.
        self.registry = AdapterRegistry(store, BaseIdentity("", ""), max_rank=cfg.lora.max_lora_rank)
        self.access = AccessInterceptor(Authenticator.from_file(cfg.security.auth_tokens_file), self.metrics,
                                        max_streams_per_client=limits.max_streams_per_client,
                                        client_id_key=cfg.security.client_id_metadata_key,
                                        base_model=lambda: self.registry.base.model_id)
        self.telemetry = Telemetry(tracer_provider or provider_from_env(), self.metrics)
        self.metrics_port: int | None = None
        self.servicer = InferenceServicer(self.registry, self.telemetry)
        self.admin = admin.AdminServicer(self.registry)
        self._server = grpc.aio.server(interceptors=[self.access], options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            # gRPC's own queue of calls no handler has picked up yet (the event loop takes them one
            # at a time): past its soft limit (default 1,000) it drops calls at random, past the hard
            # one (3,000) all, and after 30 s waiting too, each as a bare CANCELLED that nobody logs
            # or counts. Both limits at --max-pending-calls, so a burst reaches the admission that
            # answers with ErrorInfo; the wait limit stays 30 s, said here rather than assumed.
            ("grpc.server.max_pending_requests", limits.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", limits.max_pending_calls),
            ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_S)])
        # Health alone, in plaintext: Kubernetes' gRPC probes cannot speak TLS (or present a client certificate).
        self._health_server = grpc.aio.server() if cfg.fronts.health_port >= 0 else None
        self._tasks: list[asyncio.Task] = []
        self.port = 0
        self.health_port: int | None = None
        self.http = http.OpenAIFront(self.servicer, self.access, self.registry, limits.max_message_bytes,
                                     self.telemetry.tracer)
        self.http_port: int | None = None
        """The OpenAI-compatible HTTP front's bound port (None: --http-port 0, off)."""
        self._http_server = None
        self._http_task: asyncio.Task | None = None

    async def start(self) -> None:
        # Bound first: a port in use stops start-up before anything else listens.
        fronts, security = self.cfg.fronts, self.cfg.security
        http_sock = http.bind(fronts.http_host or fronts.host, fronts.http_port) if fronts.http_port else None
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, self._server)
        admin_pb2_grpc.add_AdapterAdminServiceServicer_to_server(self.admin, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(SERVICE_NAMES, self._server)
        await self._set_health(_NOT_SERVING)
        address = f"{fronts.host}:{fronts.port}"
        if security.tls_cert:
            ca = security.tls_client_ca.read_bytes() if security.tls_client_ca else None
            creds = grpc.ssl_server_credentials([(security.tls_key.read_bytes(), security.tls_cert.read_bytes())],
                                                root_certificates=ca, require_client_auth=ca is not None)
            self.port = self._server.add_secure_port(address, creds)
        else:
            self.port = self._server.add_insecure_port(address)
        await self._server.start()
        log.info("listening on %s:%d (tls=%s, mtls=%s)", fronts.host, self.port, bool(security.tls_cert),
                 bool(security.tls_client_ca))
        if self._health_server is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{fronts.host}:{fronts.health_port}")
            await self._health_server.start()
            log.info("health (plaintext, grpc.health.v1 only) on %s:%d", fronts.host, self.health_port)
        if http_sock is not None:
            await self._start_http(http_sock)

    async def _start_http(self, sock) -> None:
        """The OpenAI-compatible front, in this event loop: same servicer, admission and metrics."""
        fronts, security = self.cfg.fronts, self.cfg.security
        host, self.http_port = fronts.http_host or fronts.host, sock.getsockname()[1]
        tls = (security.tls_cert, security.tls_key, security.tls_client_ca) if security.tls_cert else None
        self._http_server = http.server(self.http, tls, CLOSE_GRACE_S)
        self._http_task = asyncio.create_task(self._http_server.serve(sockets=[sock]), name="http")
        while not self._http_server.started:  # uvicorn has no event for it; its start-up errors (TLS) surface here
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("the HTTP front ended while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP on %s://%s:%d/v1", "https" if tls else "http", host, self.http_port)

    async def load(self) -> None:
        """Load the model, attach the warm and pinned adapters, then turn SERVING."""
        cfg = self.cfg
        if cfg.registry.remote:
            await self._open_origin()
        else:
            await asyncio.to_thread(self._recover_store)
            await asyncio.to_thread(self.registry.open)
        self.metrics.watch_index(lambda: self.registry.reload_errors)
        self.registry.base = await asyncio.to_thread(base_identity, cfg.model.model_path)
        self.telemetry.model_name = self.registry.base.model_id
        if not self.engine.cfg.lora_target_modules:  # what the registry's servable adapters adapt
            targets = self.registry.snapshot().served_targets(self.registry.base.revision)
            self.engine.cfg = dataclasses.replace(self.engine.cfg, lora_target_modules=targets)
        await self.engine.start()
        self.registry.module_names = self.engine.module_names()
        self.registry.lora_modules = self.engine.lora_modules()
        stray = sorted(set(cfg.lora.lora_target_modules) - self.registry.lora_modules)
        if stray:
            raise ValueError(f"--lora-target-modules names {', '.join(stray)}, which LoRA cannot apply to in this "
                             f"model: its linear layers are {', '.join(sorted(self.engine.linear_modules()))}")
        sched, lora, telemetry, limits = cfg.scheduler, cfg.lora, cfg.telemetry, cfg.limits
        self.scheduler = Scheduler(
            self.engine, sched.batch_limits(), max_queue=sched.max_queue, batch_wait_s=sched.batch_wait_ms / 1e3,
            prefix_caching=not sched.no_prefix_caching,
            budgets=Budgets(ram=lora.ram_budget_bytes, vram=self.engine.lora_budget_bytes),
            max_loads=lora.max_concurrent_loads, failed_load_backoff_s=lora.failed_load_backoff_s,
            observer=self.telemetry, origin=self.origin, reserve_kv=cfg.engine.deterministic)
        self.metrics.watch(self.scheduler, EngineMemory(self.engine.weights_bytes(), self.engine.kv_bytes,
                                                        self.engine.stack_bytes), self.engine.lora_slots)
        if telemetry.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(telemetry.metrics_host, telemetry.metrics_port)
            log.info("metrics on http://%s:%d/metrics", telemetry.metrics_host, self.metrics_port)
        self._tasks.append(asyncio.create_task(self.scheduler.run(), name="scheduler"))
        for adapter_id in lora.warm:
            await self._warm_by_id(adapter_id)
        for adapter_id in lora.pin:
            await self.scheduler.tiers.pin(self.registry.attachable(adapter_id))
        if lora.idle_ttl_s:
            self._tasks.append(asyncio.create_task(sweep_idle_forever(self.scheduler.tiers, lora.idle_ttl_s)))
        if lora.warm_schedule:
            self._tasks.append(asyncio.create_task(warm_daily(lora.warm_times, self._warm_by_id)))
        max_context = self.engine.max_context
        log.info("context: %d tokens per sequence (prompt + max_new_tokens)", max_context)
        tokens = Tokens(self.engine.tokenizer, self.registry.base.model_id)
        self.servicer.ready(self.scheduler, tokens, RequestLimits(
            max_prompt_tokens=limits.max_prompt_tokens, max_new_tokens_limit=limits.max_new_tokens_limit,
            default_max_new_tokens=limits.default_max_new_tokens, max_batch_tokens=sched.max_batch_tokens,
            max_context=max_context, default_seed=0 if cfg.engine.deterministic else None), self.engine.check_format)
        self.admin.ready(self.scheduler, max_context, self.engine.kv_bytes())
        self._tasks.append(asyncio.create_task(self._follow_index(), name="index"))
        await self._set_health(_SERVING)
        log.info("serving %s", cfg.model.model_path)

    async def _open_origin(self) -> None:
        """The disk cache and the first read of the bucket's index (the server does not start
        without it); then the index is polled. Servers never write to the bucket."""
        cfg, store = self.cfg.registry, self.registry.store
        cache = await asyncio.to_thread(DiskCache, store.cache_dir, int(cfg.disk_cache_mib * 2**20))
        self.origin = RemoteOrigin(store, cache, self.origin_metrics, cfg.origin_timeout_s)
        await asyncio.to_thread(self.registry.open)
        log.info("adapters from %s (%d versions in its index), disk cache %s (%d of %d bytes used)", store.url,
                 len(self.registry.snapshot().passports), cache.root, cache.used, cache.budget)

    async def _follow_index(self) -> None:
        """Every --index-poll-s: pick up a changed index (a remote one only this way; a local one
        is also checked on every look-up) and say in REGISTRY_HEALTH whether it is served."""
        while True:
            await self.health.set(REGISTRY_HEALTH, _NOT_SERVING if self.registry.index_error else _SERVING)
            await asyncio.sleep(self.cfg.registry.index_poll_s)
            if self.origin is not None:
                await poll_index(self.registry, self.origin_metrics)
            else:
                self.registry.refresh()

    def _recover_store(self) -> None:
        """Finish or undo whatever a crashed writer left; a read-only store is served as it is, and
        an index that does not validate is left for `registry.open` to refuse."""
        try:
            self.registry.store.recover()
        except (OSError, StoreError) as exc:
            log.warning("adapter store %s not recovered: %s", self.cfg.registry.adapters_dir, exc)

    async def _warm_by_id(self, adapter_id: str) -> None:
        await admin.warm(self.scheduler, self.registry.attachable(adapter_id), Tier.VRAM)

    async def _set_health(self, status) -> None:
        for name in ("", *SERVICE_NAMES[:1]):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Health NOT_SERVING and new inference calls refused (UNAVAILABLE SHUTTING_DOWN); queued and
        running requests finish, up to the grace period, and those that cannot are answered
        SHUTTING_DOWN too: every call accepted ends with a status of ours, counted and logged."""
        await self.health.enter_graceful_shutdown()
        if self.scheduler is not None:
            try:
                await asyncio.wait_for(self.scheduler.drain(), self.cfg.fronts.grace_period_s)
            except asyncio.TimeoutError:
                left = self.scheduler.abandon(ShuttingDown(
                    f"the server is shutting down and its grace period ({self.cfg.fronts.grace_period_s:g} s) ended "
                    "before this request finished; retry on another replica"))
                log.warning("grace period over: %d requests still queued or running answered SHUTTING_DOWN", left)
        # Handlers have their answers; give them a moment to send them, then close.
        await asyncio.gather(self._server.stop(grace=CLOSE_GRACE_S), self._stop_http())
        await self.servicer.rollouts.close()  # a canary abort being written to the store
        await self.servicer.shadows.close()
        if self._health_server is not None:  # answered NOT_SERVING throughout the drain
            await self._health_server.stop(grace=None)
        for task in self._tasks:
            task.cancel()
        self.metrics.close()
        self.telemetry.shutdown()
        if self.origin is not None:
            self.origin.cache.close()
        await self.engine.close()

    async def _stop_http(self) -> None:
        """uvicorn stops listening, closes idle keep-alive connections and waits up to CLOSE_GRACE_S
        for the responses still being sent."""
        if self._http_task is not None:
            self._http_server.should_exit = True
            await self._http_task

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
