"""AdapterAdminService and the cache as seen through gRPC: tiers, pins, evictions, warm set, idle TTL."""

from __future__ import annotations

import time

import grpc
import pytest

from conftest import PROMPT, ServerThread, one_adapter_bytes, room_for_one_in_ram, server_config
from loraserve.v1 import admin_pb2 as apb
from loraserve.v1 import admin_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.server.app import engine_config
from test_generate import details
from test_lifecycle import PacedEngine, wait_for

@pytest.fixture(scope="module")
def cached(demo_dir):
    # VRAM holds two demo adapters, RAM one; `legal` is attached at start-up.
    cfg = room_for_one_in_ram(demo_dir, max_loras=2, warm=("legal",))
    srv = ServerThread(cfg, engine=PacedEngine(engine_config(cfg)))
    with srv.channel() as ch:
        yield srv, admin_pb2_grpc.AdapterAdminServiceStub(ch), inference_pb2_grpc.InferenceServiceStub(ch)
    srv.stop()


def tiers(admin) -> dict[str, apb.AdapterStatus]:
    return {a.id: a for a in admin.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters}


def ask(stub, adapter, **kw):
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=4, **kw), timeout=60)


def stats(admin) -> dict[int, apb.TierStats]:
    return {t.tier: t for t in admin.GetCacheStats(apb.GetCacheStatsRequest(), timeout=10).tiers}


def test_cache_lifecycle_through_admin_rpcs(cached):
    srv, admin, stub = cached
    listed = tiers(admin)
    assert listed["legal"].tier == apb.TIER_VRAM and listed["legal"].size_bytes > 0  # warm set
    assert listed["medical"].tier == apb.TIER_DISK and listed["medical"].size_bytes == 0
    assert ask(stub, "legal").adapter.load_source == pb.LOAD_SOURCE_VRAM

    before = stats(admin)[apb.TIER_VRAM]
    assert ask(stub, "medical").adapter.load_source == pb.LOAD_SOURCE_DISK
    assert ask(stub, "medical").adapter.load_source == pb.LOAD_SOURCE_VRAM
    after = stats(admin)[apb.TIER_VRAM]
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 1)

    pinned = admin.PinAdapter(apb.PinAdapterRequest(adapter_id="support"), timeout=30).adapter
    assert pinned.pinned and pinned.tier == apb.TIER_VRAM
    for adapter in ("legal", "medical", "legal", "medical"):  # pressure: only one unpinned VRAM slot
        ask(stub, adapter)
        assert tiers(admin)["support"].tier == apb.TIER_VRAM
    with pytest.raises(grpc.RpcError) as caught:
        admin.EvictAdapter(apb.EvictAdapterRequest(adapter_id="support"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value)[0].reason == "ADAPTER_BUSY"

    admin.UnpinAdapter(apb.UnpinAdapterRequest(adapter_id="support"), timeout=10)
    moved = admin.EvictAdapter(apb.EvictAdapterRequest(adapter_id="support", tier=apb.TIER_RAM), timeout=10).adapter
    assert moved.tier == apb.TIER_RAM and not moved.pinned
    assert ask(stub, "support").adapter.load_source == pb.LOAD_SOURCE_RAM
    gone = admin.EvictAdapter(apb.EvictAdapterRequest(adapter_id="support"), timeout=10).adapter
    assert gone.tier == apb.TIER_DISK

    warmed = admin.WarmAdapter(apb.WarmAdapterRequest(adapter_id="support", tier=apb.TIER_RAM), timeout=30).adapter
    assert warmed.tier == apb.TIER_RAM
    # RAM holds one: warming another there evicts support. (Attaches above never demoted a victim
    # into RAM: the adapter being attached holds its RAM copy until then, so there was no room.)
    admin.EvictAdapter(apb.EvictAdapterRequest(adapter_id="legal", tier=apb.TIER_DISK), timeout=10)
    admin.WarmAdapter(apb.WarmAdapterRequest(adapter_id="legal", tier=apb.TIER_RAM), timeout=30)
    assert tiers(admin)["support"].tier == apb.TIER_DISK

    for tier in stats(admin).values():
        assert 0 < tier.bytes_used <= tier.bytes_budget and tier.evictions > 0
    ram, slot = one_adapter_bytes(srv.server.cfg)  # as this server holds one, in its dtype
    assert stats(admin)[apb.TIER_VRAM].bytes_budget == 2 * slot and stats(admin)[apb.TIER_RAM].bytes_used == ram
    assert admin.GetCacheStats(apb.GetCacheStatsRequest(), timeout=10).peak_loads_in_flight <= 2


def test_an_adapter_in_use_cannot_be_evicted(cached):
    srv, admin, stub = cached
    busy = stub.Generate.future(pb.GenerateRequest(adapter_id="medical", prompt=PROMPT, max_new_tokens=200,
                                                   ignore_eos=True), timeout=60)
    assert wait_for(lambda: srv.server.scheduler.running == 1)
    assert tiers(admin)["medical"].in_use
    with pytest.raises(grpc.RpcError) as caught:
        admin.EvictAdapter(apb.EvictAdapterRequest(adapter_id="medical"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Pressure from the other adapters while it runs does not take it away either.
    for adapter in ("legal", "support"):
        admin.WarmAdapter(apb.WarmAdapterRequest(adapter_id=adapter), timeout=30)
    assert busy.result().usage.output_tokens == 200 and busy.result().adapter.id == "medical"


@pytest.mark.parametrize("call, request_, code", [
    ("WarmAdapter", apb.WarmAdapterRequest(adapter_id="ghost"), grpc.StatusCode.NOT_FOUND),
    ("WarmAdapter", apb.WarmAdapterRequest(adapter_id="base"), grpc.StatusCode.INVALID_ARGUMENT),
    ("WarmAdapter", apb.WarmAdapterRequest(adapter_id="legal", tier=apb.TIER_DISK), grpc.StatusCode.INVALID_ARGUMENT),
    ("EvictAdapter", apb.EvictAdapterRequest(adapter_id="legal", tier=apb.TIER_VRAM),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("PinAdapter", apb.PinAdapterRequest(adapter_id="../x"), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_admin_requests(cached, call, request_, code):
    _, admin, stub = cached
    with pytest.raises(grpc.RpcError) as caught:
        getattr(admin, call)(request_, timeout=10)
    assert caught.value.code() == code
    assert ask(stub, "legal").usage.output_tokens == 4


def test_idle_adapters_are_unloaded_after_the_ttl(demo_dir):
    srv = ServerThread(server_config(demo_dir, idle_ttl_s=0.3, pin=("support",)))
    try:
        with srv.channel() as ch:
            admin = admin_pb2_grpc.AdapterAdminServiceStub(ch)
            ask(inference_pb2_grpc.InferenceServiceStub(ch), "legal")
            assert tiers(admin)["legal"].tier == apb.TIER_VRAM
            assert wait_for(lambda: tiers(admin)["legal"].tier == apb.TIER_DISK, 10)
            time.sleep(0.5)
            assert tiers(admin)["support"].tier == apb.TIER_VRAM  # pinned adapters stay
    finally:
        srv.stop()
