"""Adapter affinity over local replicas with gRPC's ring_hash policy on `x-adapter-id`."""

from __future__ import annotations

from loraserve.clients.affinity import headless, replicas
from loraserve.clients.client import LoraServeClient
from conftest import ADAPTERS, PROMPT, ServerThread, clone_adapter, server_config


def test_ring_hash_keeps_each_adapter_on_one_replica(demo_dir, tmp_path):
    root = tmp_path / "store"
    names = [f"{ADAPTERS[i % 3]}{i}" for i in range(12)]
    for i, name in enumerate(names):
        clone_adapter(demo_dir, root, ADAPTERS[i % 3], name)
    servers = [ServerThread(server_config(demo_dir, adapters_dir=root)) for _ in range(3)]
    try:
        target, options = replicas(*(s.target for s in servers))
        with LoraServeClient(target, options=options, timeout=60) as client:
            for _ in range(3):
                for i, name in enumerate(names):
                    result = client.generate(name, PROMPT, max_new_tokens=4)
                    assert result.adapter_id == name
        loaded = [{st.adapter.id for st in s.server.scheduler.tiers.adapter_states()} for s in servers]
        for name in names:
            holders = [i for i, held in enumerate(loaded) if name in held]
            assert len(holders) == 1, f"{name} was loaded on replicas {holders}"
        assert sum(1 for held in loaded if held) >= 2, "the ring spread adapters over the replicas"
        served = [s.server.scheduler.stats.completed for s in servers]
        assert sum(served) == 36
    finally:
        for s in servers:
            s.stop()


def test_headless_hashes_over_what_dns_answers(demo_dir):
    """headless(): the same ring over what DNS answers, as for a Kubernetes headless Service
    (here "localhost": 127.0.0.1, where the server is, and ::1, where nothing listens)."""
    server = ServerThread(server_config(demo_dir))
    try:
        target, options = headless(f"localhost:{server.server.port}")
        assert target.startswith("dns:///")
        with LoraServeClient(target, options=options, timeout=60) as client:
            assert [client.generate(a, PROMPT, max_new_tokens=4).adapter_id for a in ADAPTERS] == list(ADAPTERS)
    finally:
        server.stop()
