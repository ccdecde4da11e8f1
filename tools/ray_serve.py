"""Ray Serve deployment (optional extra: pip install 'loraserve[ray]').

Each Serve replica runs the whole loraserve stack (scheduler, tiered cache, validation,
errors, spans) on a loopback port and answers through it. Adapters are Serve *multiplexed
models*: Serve routes a request to a replica that already holds its adapter, and when a
replica's multiplex LRU drops one, the adapter leaves that replica's VRAM too.

    serve run tools.ray_serve:app model_path=/models/base adapters_dir=/models/adapters

Callers name the adapter as the multiplexed model id: HTTP header
`serve_multiplexed_model_id: legal` with a JSON body {"prompt": ..., "max_new_tokens": ...},
or `handle.options(multiplexed_model_id="legal").generate.remote(prompt)`.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path

from ray import serve

from loraserve.clients.client import AsyncLoraServeClient, RequestFailed
from loraserve.contract import BASE_ADAPTER_ID
from loraserve.scheduler.types import Tier
from loraserve.server import admin
from loraserve.server.app import LoraServer
from loraserve.server.settings import load


class _Resident:
    """What Serve's multiplex cache holds for one adapter. Serve calls __del__ (on a worker
    thread) when it unloads the model; the adapter then moves back to host RAM."""

    def __init__(self, server: LoraServer, adapter_id: str, loop: asyncio.AbstractEventLoop):
        self.server, self.adapter_id, self._loop = server, adapter_id, loop
        self._released = False

    def __del__(self):
        if self._released or self.server.scheduler is None or self._loop.is_closed():
            return
        self._released = True
        ref = self.server.registry.resolve(self.adapter_id, check_access=False).adapter
        evict = self.server.scheduler.tiers.evict(ref, Tier.RAM)
        asyncio.run_coroutine_threadsafe(evict, self._loop)


@serve.deployment(num_replicas=2, max_ongoing_requests=256)
class LoraServeDeployment:
    def __init__(self, model_path: str, adapters_dir: str, **config):
        self._cfg = load(dict(port=0, metrics_port=-1, http_port=0, model_path=Path(model_path),
                              adapters_dir=adapters_dir, **config), env={})
        self._server: LoraServer | None = None
        self._client: AsyncLoraServeClient | None = None
        self._starting = asyncio.Lock()

    async def _ready(self) -> LoraServer:
        async with self._starting:
            if self._server is None:
                server = LoraServer(self._cfg)
                await server.start()
                await server.load()
                self._client = AsyncLoraServeClient(f"127.0.0.1:{server.port}", timeout=600)
                self._server = server
        return self._server

    @serve.multiplexed(max_num_models_per_replica=16)
    async def get_adapter(self, adapter_id: str) -> _Resident:
        server = await self._ready()
        if adapter_id != BASE_ADAPTER_ID:
            found = server.registry.resolve(adapter_id, check_access=False)
            if found.problem is None:  # else the request itself reports why, or falls back to the base model
                await admin.warm(server.scheduler, found.adapter, Tier.VRAM)
        return _Resident(server, adapter_id, asyncio.get_running_loop())

    async def generate(self, prompt: str, **params) -> dict:
        """The adapter is the request's multiplexed model id; params as LoraServeClient.generate."""
        adapter_id = serve.get_multiplexed_model_id() or BASE_ADAPTER_ID
        await self.get_adapter(adapter_id)
        try:
            return asdict(await self._client.generate(adapter_id, prompt, **params))
        except RequestFailed as exc:
            return {"error": {"code": exc.code.name, "reason": exc.reason, "message": exc.message}}

    async def __call__(self, request) -> dict:
        body = await request.json()
        return await self.generate(body.pop("prompt"), **body)


def app(args: dict) -> serve.Application:
    """`serve run tools.ray_serve:app model_path=... adapters_dir=... [num_replicas=2]`."""
    args = dict(args)
    replicas = int(args.pop("num_replicas", 2))
    return LoraServeDeployment.options(num_replicas=replicas).bind(**args)
