"""AdapterAdminService: look at and steer the tiered adapter cache."""

from __future__ import annotations

import time

from loraserve.v1 import admin_pb2 as pb
from loraserve.v1 import admin_pb2_grpc
from loraserve.registry.passport import Passport
from loraserve.scheduler.errors import InvalidArgument, NotReady
from loraserve.scheduler.scheduler import Scheduler
from loraserve.scheduler.tiers import AdapterState
from loraserve.scheduler.types import AdapterRef, Tier
from loraserve.server.adapters import AdapterRegistry
from loraserve.server.convert import PB_TIER, TIER_PB
from loraserve.server.errors import unary_errors


async def warm(scheduler: Scheduler, adapter: AdapterRef, tier: Tier) -> None:
    if tier is Tier.VRAM:
        await scheduler.tiers.to_vram(adapter)
    else:
        await scheduler.tiers.to_ram(adapter)


class AdminServicer(admin_pb2_grpc.AdapterAdminServiceServicer):
    """loraserve.server.interceptors lets only admin callers (when authentication is on) reach it."""

    def __init__(self, registry: AdapterRegistry):
        self._registry = registry
        self._scheduler: Scheduler | None = None
        self._max_context = self._kv_pool_bytes = 0

    def ready(self, scheduler: Scheduler, max_context: int, kv_pool_bytes: int = 0) -> None:
        self._scheduler, self._max_context, self._kv_pool_bytes = scheduler, max_context, kv_pool_bytes

    def _sched(self) -> Scheduler:
        if self._scheduler is None:
            raise NotReady("the model is still loading; retry shortly")
        return self._scheduler

    def _resolve(self, adapter_id: str) -> AdapterRef:
        """For letting go (evict, unpin): any version, even one that may no longer be attached."""
        self._sched()
        found = self._registry.resolve(adapter_id, check_access=False)
        if found.adapter.is_base:
            raise InvalidArgument("adapter_id", "'base' is the model itself and is always resident")
        return found.adapter

    def _attachable(self, adapter_id: str) -> AdapterRef:
        self._sched()
        return self._registry.attachable(adapter_id)

    def _status(self, ref: AdapterRef) -> pb.AdapterStatus:
        return _status_pb(self._sched().tiers.state(ref))

    @unary_errors
    async def ListAdapters(self, request, context):
        tiers = self._sched().tiers
        states = {s.adapter: s for s in tiers.adapter_states()}  # also versions no longer in the store
        for ref in self._registry.refs():
            if ref not in states:
                states[ref] = tiers.state(ref)
        ordered = sorted(states.values(), key=lambda s: (s.adapter.id, s.adapter.version))
        snap = self._registry.snapshot()
        return pb.ListAdaptersResponse(adapters=[_status_pb(s, snap.get(s.adapter.id, s.adapter.version))
                                                 for s in ordered])

    @unary_errors
    async def WarmAdapter(self, request, context):
        ref = self._attachable(request.adapter_id)
        tier = PB_TIER.get(request.tier, Tier.VRAM)
        if tier is Tier.DISK:
            raise InvalidArgument("tier", "warm to TIER_RAM or TIER_VRAM")
        await warm(self._sched(), ref, tier)
        return pb.WarmAdapterResponse(adapter=self._status(ref))

    @unary_errors
    async def EvictAdapter(self, request, context):
        ref = self._resolve(request.adapter_id)
        tier = PB_TIER.get(request.tier, Tier.DISK)
        if tier is Tier.VRAM:
            raise InvalidArgument("tier", "evict to TIER_RAM or TIER_DISK")
        await self._sched().tiers.evict(ref, tier)
        return pb.EvictAdapterResponse(adapter=self._status(ref))

    @unary_errors
    async def PinAdapter(self, request, context):
        ref = self._attachable(request.adapter_id)
        await self._sched().tiers.pin(ref)
        return pb.PinAdapterResponse(adapter=self._status(ref))

    @unary_errors
    async def UnpinAdapter(self, request, context):
        ref = self._resolve(request.adapter_id)
        self._sched().tiers.unpin(ref)
        return pb.UnpinAdapterResponse(adapter=self._status(ref))

    @unary_errors
    async def GetCacheStats(self, request, context):
        sched = self._sched()
        tiers = sched.tiers
        kv = sched.kv_blocks  # kv_slots and kv_slots_in_use are deprecated: left 0
        out = pb.GetCacheStatsResponse(loads_in_flight=tiers.loads.running, peak_loads_in_flight=tiers.loads.peak,
                                       max_context_tokens=self._max_context, kv_pool_bytes=self._kv_pool_bytes,
                                       kv_block_size=kv.block_size, kv_blocks_total=kv.total, kv_blocks_used=kv.used,
                                       kv_blocks_cached=kv.cached, kv_tokens_held=sched.kv_tokens_held,
                                       kv_pool_tokens=kv.total * kv.block_size,
                                       prefix_cache_queried_tokens=kv.prefix.queried_tokens,
                                       prefix_cache_hit_tokens=kv.prefix.hit_tokens,
                                       preemptions=sched.stats.preemptions,
                                       registry_reload_errors=self._registry.reload_errors,
                                       registry_index_error=self._registry.index_error)
        states = tiers.tier_states()
        for tier in (Tier.VRAM, Tier.RAM):
            st = states[tier]
            out.tiers.add(tier=TIER_PB[tier], hits=st.stats.hits, misses=st.stats.misses, loads=st.stats.loads,
                          evictions=st.stats.evictions, bytes_used=st.bytes_used, bytes_budget=st.budget,
                          adapters=st.adapters)
        return out


def _status_pb(state: AdapterState, passport: Passport | None = None) -> pb.AdapterStatus:
    """`passport`: the version's in the store now (None: no longer there, or not asked for)."""
    ref = state.adapter
    status = pb.AdapterStatus(id=ref.id, version=ref.version, tier=TIER_PB[state.tier], in_use=state.in_use,
                              pinned=state.pinned, size_bytes=state.bytes)
    if passport is not None:
        status.status = passport.status
        if (c := passport.canary) is not None:
            status.canary.CopyFrom(pb.CanaryState(state=c.state, percent=c.percent, key=c.key, started_at=c.started_at,
                                                  ended_at=c.ended_at, reason=c.reason))
    if state.idle_s is not None:
        status.last_used.FromNanoseconds(int((time.time() - state.idle_s) * 1e9))
    return status
