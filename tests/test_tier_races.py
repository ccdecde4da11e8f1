"""Evictions, warm-ups, pins and unpins of the very adapters requests are using, from several
threads at once against the real server: every request is answered, by its adapter, exactly
as it is alone (the report behind this test saw INTERNAL KeyErrors in 9 of 1,452 requests)."""

from __future__ import annotations

import threading
import time

import grpc

from conftest import PROMPT, ServerThread, comparable, server_config
from loraserve.v1 import admin_pb2 as apb
from loraserve.v1 import admin_pb2_grpc, inference_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from test_generate import details

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
