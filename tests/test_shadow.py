"""Shadow versions: the scheduler runs shadows only on spare capacity and sheds them first (a
scripted engine, milliseconds), the store's shadow lifecycle, and a served shadow whose answers
are compared with the served ones and never returned."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace

import pytest

from conftest import PROMPT, ServerThread, clone_adapter, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.registry.rollout import Shadow
from loraserve.registry.errors import StoreError
from loraserve.registry.snapshot import now_iso
from loraserve.registry.store import Store
from loraserve.scheduler.errors import Shed
from loraserve.scheduler.policy import BatchLimits
from loraserve.server.shadow import agreement
from test_crash import passed
from test_policy import BASE
from test_scheduler import ScriptedEngine, ref, req, run
from tiny import tiny_adapter


def shadow_of(r):
    return replace(r, request_id=r.request_id + "~shadow", shadow=True, client="~shadow")


def test_a_real_request_takes_a_running_shadows_row():
    engine = ScriptedEngine()

    async def scenario(s):
        engine.gate = asyncio.Event()
        shadows = [s.submit(shadow_of(req(f"s{i}", ref("abcdefgh"), max_new=20))) for i in range(2)]
        await asyncio.sleep(0.01)  # both shadows hold the two rows
        real = s.submit(req("real", ref("xy"), max_new=20))
        await asyncio.sleep(0.01)
        engine.gate.set()
        outcomes = []
        for t in shadows:
            try:
                outcomes.append((await t.result()).text)
            except Shed:
                outcomes.append("shed")
        return outcomes, (await real.result()).text, s.stats

    shadows, real, stats = run(engine, scenario, limits=BatchLimits(max_batch_size=2, join_delay_s=0))
    assert real == "xy"
    assert shadows == ["shed", "shed"] and stats.shadows_shed == 2  # a batch of 2 has room for shadows only idle


def test_shadows_leave_once_real_rows_reach_a_quarter_of_the_batch():
    engine = ScriptedEngine()

    async def scenario(s):
        engine.gate = asyncio.Event()
        shadows = [s.submit(shadow_of(req(f"s{i}", ref("abcdefgh"), max_new=20))) for i in range(2)]
        await asyncio.sleep(0.01)
        first = s.submit(req("r0", ref("xy"), max_new=20))
        await asyncio.sleep(0.01)
        kept = s.stats.shadows_shed  # one real row of a batch of 8: below a quarter, the shadows stay
        second = s.submit(req("r1", ref("uv"), max_new=20))
        await asyncio.sleep(0.01)
        engine.gate.set()
        for t in shadows:
            with pytest.raises(Shed):
                await t.result()
        return kept, [(await t.result()).text for t in (first, second)], s.stats

    kept, texts, stats = run(engine, scenario, limits=BatchLimits(max_batch_size=8, join_delay_s=0))
    assert kept == 0 and texts == ["xy", "uv"] and stats.shadows_shed == 2


def test_no_shadow_waits_or_joins_while_a_real_request_waits():
    engine = ScriptedEngine()

    async def scenario(s):
        engine.gate = asyncio.Event()
        busy = s.submit(req("busy", ref("abcdefgh"), max_new=20))
        await asyncio.sleep(0.01)  # it holds the one row
        real = s.submit(req("real", ref("xy"), max_new=20))
        shadow = s.submit(shadow_of(req("s", ref("xy"), max_new=20)))
        await asyncio.sleep(0.01)
        engine.gate.set()
        with pytest.raises(Shed):
            await shadow.result()
        return (await busy.result()).text, (await real.result()).text

    assert run(engine, scenario, limits=BatchLimits(max_batch_size=1, join_delay_s=0)) == ("abcdefgh", "xy")
    assert all("s" not in str(p) for p in engine.prefills)


def test_kv_pressure_sheds_a_shadow_before_preempting_a_real_row():
    engine = ScriptedEngine()
    engine.kv_blocks = 10  # 40 positions; each grows to 2 + 16 letters + EOS: 5 blocks; three cannot
    names = ["abcdefghijklmnop", "qrstuvwxyzabcdef"]

    async def scenario(s):
        shadow = s.submit(shadow_of(req("s", ref("ghijklmnopqrstuv"), max_new=40)))
        reals = [s.submit(req(f"r{i}", ref(n), max_new=40)) for i, n in enumerate(names)]
        with pytest.raises(Shed):
            await shadow.result()
        return [(await t.result()).text for t in reals], s.stats

    # A batch of 12: two real rows stay under a quarter of it, so only KV pressure sheds the shadow.
    texts, stats = run(engine, scenario, limits=BatchLimits(max_batch_size=12, join_delay_s=0))
    assert texts == names and stats.preemptions == 0 and stats.shadows_shed == 1


def test_agreement_is_the_share_of_positions_that_agree():
    assert agreement((1, 2, 3), (1, 2, 3)) == 1.0
    assert agreement((1, 2, 3, 4), (1, 9, 3)) == 0.5
    assert agreement((), ()) == 1.0


def test_shadow_lifecycle(any_store, tmp_path):
    store = any_store
    raw = tiny_adapter(tmp_path / "raw")
    for _ in range(3):
        store.register(raw, "legal", BASE, passed)
    with pytest.raises(StoreError, match="no active version to shadow"):
        store.shadow("legal", "2", Shadow(50, now_iso()))
    store.promote("legal", "1")
    with pytest.raises(StoreError, match="legal@1 is active"):
        store.shadow("legal", "1", Shadow(50, now_iso()))
    store.shadow("legal", "2", Shadow(50, now_iso()))
    store.shadow("legal", "3", Shadow(10, now_iso()))  # one shadow per adapter: 2's ends
    snap = store.snapshot()
    assert snap.shadow("legal").version == "3" and snap.get("legal", "2").shadow is None
    store.shadow("legal", "3", None)
    assert store.snapshot().shadow("legal") is None
    store.shadow("legal", "2", Shadow(50, now_iso()))
    store.promote("legal", "2")  # a promoted version shadows nothing
    assert store.snapshot().shadow("legal") is None
    with pytest.raises(ValueError):
        Shadow(0, now_iso())


@pytest.fixture(scope="module")
def shadowed(demo_dir, tmp_path_factory):
    """legal@1 (the demo's legal) active, legal@2 (the demo's medical weights) shadowing it."""
    root = tmp_path_factory.mktemp("store")
    clone_adapter(demo_dir, root, "legal", "legal")
    clone_adapter(demo_dir, root, "medical", "legal", "2", status="staging", promoted_at="")
    srv = ServerThread(server_config(demo_dir, adapters_dir=root))
    with srv.channel() as ch:
        yield srv, Store.local(root), inference_pb2_grpc.InferenceServiceStub(ch)
    srv.stop()


def test_a_shadow_is_compared_and_never_returned(shadowed, caplog):
    srv, store, stub = shadowed
    ask = pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=4)
    alone = stub.Generate(ask, timeout=120)
    shadow_alone = stub.Generate(pb.GenerateRequest(adapter_id="legal@2", prompt=PROMPT, max_new_tokens=4),
                                 timeout=120)
    assert alone.text != shadow_alone.text
    store.shadow("legal", "2", Shadow(100, now_iso()))
    with caplog.at_level(logging.INFO, logger="loraserve.shadow"):
        answers = [stub.Generate(ask, timeout=120) for _ in range(6)]
        samples = srv.server.metrics.registry.get_sample_value
        deadline = time.monotonic() + 60
        while (samples("loraserve_shadow_requests_total", {"adapter": "legal", "version": "2", "outcome": "differ"})
               or 0) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert {(a.adapter.version, a.text) for a in answers} == {("1", alone.text)}
    assert samples("loraserve_shadow_seconds_count", {"adapter": "legal", "version": "2"}) == 6
    logged = [r.getMessage() for r in caplog.records if r.name == "loraserve.shadow"]
    assert len(logged) == 6 and all('"match": false' in m and '"shadow": "legal@2"' in m for m in logged)
    assert shadow_alone.text[:50] in logged[0]
    store.shadow("legal", "2", None)


def test_the_shadow_benchmark_runs(demo_dir, capsys):
    from loraserve.tools.bench.shadow import main

    assert main(["--demo", str(demo_dir), "--clients", "2", "--requests", "4", "--rounds", "2",
                 "--new-tokens", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["p95_ratio"] > 0 and sum(result["shadow_outcomes"].values()) > 0
