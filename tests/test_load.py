"""Bounded load on loopback: a thousand concurrent mixed-adapter requests, and a short soak
with adapter churn (`loraserve soak --duration 600` runs the long one)."""

from __future__ import annotations

import asyncio
import random

from loraserve.tools.bench.soak import PROMPTS, run_soak
from loraserve.clients.client import AsyncLoraServeClient
from conftest import ADAPTERS, ServerThread, clone_adapter, comparable, server_config

MIXED = (*ADAPTERS, "base")


def test_a_thousand_concurrent_requests_each_answered_by_its_adapter(demo_dir):
    srv = ServerThread(comparable(server_config(demo_dir, max_batch_size=32, max_queue=2000,
                                                max_streams_per_client=0)))
    rng = random.Random(0)
    work = [(rng.choice(MIXED), rng.choice(PROMPTS)) for _ in range(1000)]

    async def scenario():
        async with AsyncLoraServeClient(srv.target, timeout=300) as client:
            alone = {key: (await client.generate(*key, max_new_tokens=6)).text for key in set(work)}
            results = await asyncio.gather(*(client.generate(a, p, max_new_tokens=6) for a, p in work))
        return alone, results

    try:
        alone, results = asyncio.run(scenario())
        assert len(results) == 1000
        wrong = [(a, r.adapter_id, r.text) for (a, p), r in zip(work, results) if
                 (r.adapter_id, r.text) != (a, alone[a, p])]
        assert not wrong, wrong[:5]
        stats = srv.server.scheduler.stats
        assert stats.failed == 0 and stats.completed >= 1000
    finally:
        srv.stop()


def test_short_soak_with_adapter_churn_is_correct_and_memory_stays_flat(demo_dir, tmp_path):
    root = tmp_path / "store"
    names = []
    for i in range(9):  # more adapters than VRAM holds, so traffic itself keeps evicting too
        names.append(f"{ADAPTERS[i % 3]}{i}")
        clone_adapter(demo_dir, root, ADAPTERS[i % 3], names[-1])

    srv = ServerThread(comparable(server_config(demo_dir, adapters_dir=root, max_loras=4,
                                                max_streams_per_client=0)))
    try:
        report = asyncio.run(run_soak(srv.target, [*names, "base"], duration_s=20, concurrency=24,
                                      churn_every_s=0.2,
                                      metrics_url=f"http://127.0.0.1:{srv.server.metrics_port}/metrics"))
    finally:
        srv.stop()
    summary = report.summary()
    assert report.requests > 100 and report.ok == report.requests, summary
    assert not report.mismatches and not report.errors, summary
    assert report.churn["evicted"] >= 10 and report.churn["warmed"] >= 10, summary
    assert report.rss_growth_mib < 64, summary
