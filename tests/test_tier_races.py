"""Evictions, warm-ups, pins and unpins of the very adapters requests are using, from several
threads at once against the real server: every request is answered, by its adapter, exactly
as it is alone (the report behind this test saw INTERNAL KeyErrors in 9 of 1,452 requests)."""

from __future__ import annotations

import threading
import time

import grpc

from conftest import ADAPTERS, PROMPT, ServerThread, clone_adapter, comparable, one_adapter_bytes, server_config
from loraserve.v1 import admin_pb2 as apb
from loraserve.v1 import admin_pb2_grpc, inference_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from test_generate import details
from test_observability import scrape

REFUSALS = {"ADAPTER_BUSY", "CACHE_FULL"}  # an admin move refused while requests use the adapter
DURATION_S = 8.0


def test_admin_churn_racing_requests_never_fails_or_changes_an_answer(demo_dir):
    srv = ServerThread(comparable(server_config(demo_dir, idle_ttl_s=0.05)))  # idle expiry joins the churn
    requests = [pb.GenerateRequest(adapter_id=a, prompt=f"{PROMPT} {i}", max_new_tokens=8)
                for i, a in enumerate(("support", "legal", "support", "base"))]
    errors, answers, moves, refused = [], [], [0], []
    try:
        with srv.channel() as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            admin = admin_pb2_grpc.AdapterAdminServiceStub(ch)
            alone = [stub.Generate(r, timeout=30).text for r in requests]
            stop = time.monotonic() + DURATION_S

            def client(i):
                while time.monotonic() < stop:
                    try:
                        answers.append((i, stub.Generate(requests[i], timeout=30).text))
                    except grpc.RpcError as exc:
                        errors.append((exc.code(), exc.details()))

            def churn(ops):
                while time.monotonic() < stop:
                    for op in ops:
                        try:
                            op()
                            moves[0] += 1
                        except grpc.RpcError as exc:
                            reason = details(exc)[0].reason
                            (refused if reason in REFUSALS else errors).append((exc.code(), reason))

            ids = ("support", "legal")
            evict_disk = [lambda a=a: admin.EvictAdapter(apb.EvictAdapterRequest(adapter_id=a, tier=apb.TIER_DISK),
                                                         timeout=30) for a in ids]
            evict_ram = [lambda a=a: admin.EvictAdapter(apb.EvictAdapterRequest(adapter_id=a, tier=apb.TIER_RAM),
                                                        timeout=30) for a in ids]
            warm = [lambda a=a: admin.WarmAdapter(apb.WarmAdapterRequest(adapter_id=a, tier=apb.TIER_VRAM),
                                                  timeout=30) for a in ids]
            pins = [f for a in ids for f in (
                lambda a=a: admin.PinAdapter(apb.PinAdapterRequest(adapter_id=a), timeout=30),
                lambda a=a: admin.UnpinAdapter(apb.UnpinAdapterRequest(adapter_id=a), timeout=30))]
            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
            threads += [threading.Thread(target=churn, args=(ops,)) for ops in
                        (evict_disk + warm, evict_ram + pins)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        srv.stop()
    assert not errors, errors[:5]
    assert len(answers) > 30 and moves[0] > 30, (len(answers), moves, len(refused))
    wrong = [(i, text) for i, text in answers if text != alone[i]]
    assert not wrong, wrong[:3]


def test_no_scrape_or_stats_call_during_churn_sees_a_tier_over_budget(demo_dir, tmp_path):
    """Nine adapters cycled through two slots and a RAM tier that holds seven: every attach demotes
    one. GetCacheStats and /metrics, polled throughout from other threads, never report more bytes
    or adapters than a tier holds (the issue saw 8 where 7 fit)."""
    root = tmp_path / "store"
    names = [f"a{i}" for i in range(9)]
    for i, name in enumerate(names):
        clone_adapter(demo_dir, root, ADAPTERS[i % 3], name)
    ram, _ = one_adapter_bytes(server_config(demo_dir, max_loras=2))
    srv = ServerThread(server_config(demo_dir, adapters_dir=root, max_loras=2, ram_budget_mib=7.5 * ram / 2**20))
    seen, errors, stop = {"stats": 0, "scrapes": 0}, [], threading.Event()
    try:
        with srv.channel() as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            admin = admin_pb2_grpc.AdapterAdminServiceStub(ch)

            def client(offset):
                i = offset
                while not stop.is_set():
                    try:
                        stub.Generate(pb.GenerateRequest(adapter_id=names[i % 9], prompt=PROMPT, max_new_tokens=2),
                                      timeout=30)
                    except grpc.RpcError as exc:
                        errors.append((exc.code(), exc.details()))
                    i += 1

            def poll_stats():
                while not stop.is_set():
                    for t in admin.GetCacheStats(apb.GetCacheStatsRequest(), timeout=10).tiers:
                        over = t.bytes_used > t.bytes_budget or t.adapters > {apb.TIER_RAM: 7, apb.TIER_VRAM: 2}[t.tier]
                        if over:
                            errors.append(("GetCacheStats", t))
                    seen["stats"] += 1

            def poll_metrics():
                while not stop.is_set():
                    m = scrape(srv)
                    for tier, fit in (("ram", 7), ("vram", 2)):
                        if (m[f'loraserve_cache_bytes{{tier="{tier}"}}'] > m[f'loraserve_cache_budget_bytes{{tier="{tier}"}}']
                                or m[f'loraserve_resident_adapters{{tier="{tier}"}}'] > fit):
                            errors.append(("/metrics", tier, m[f'loraserve_resident_adapters{{tier="{tier}"}}']))
                    seen["scrapes"] += 1

            threads = [threading.Thread(target=client, args=(k * 3,)) for k in range(3)]
            threads += [threading.Thread(target=poll_stats), threading.Thread(target=poll_metrics)]
            for t in threads:
                t.start()

            def evictions():
                return {t.tier: t.evictions for t in admin.GetCacheStats(apb.GetCacheStatsRequest(), timeout=10).tiers}

            # DURATION_S at least, and on until it has churned enough to mean something (a slow or
            # busy machine moves fewer adapters in the same time), within a bound.
            time.sleep(DURATION_S)
            deadline = time.monotonic() + 6 * DURATION_S
            while not (evictions()[apb.TIER_VRAM] > 20 and evictions()[apb.TIER_RAM] > 0) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(60)
            evictions = evictions()
    finally:
        srv.stop()
    assert not errors, errors[:5]
    assert seen["stats"] > 50 and seen["scrapes"] > 20, seen
    assert evictions[apb.TIER_VRAM] > 20 and evictions[apb.TIER_RAM] > 0, evictions  # it did churn
