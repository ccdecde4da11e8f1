"""What a shadow costs the real requests: the real server in process, a closed loop of clients
asking for `legal`, in rounds alternating no shadow and a shadow version at 100% (ABBA, so both
see the same machine state); the real requests' latency p95 of each kind over all rounds, and their
ratio. The store is made from the demo's adapters: legal@1 (the demo's legal) active, legal@2
(the demo's medical weights) shadowing it.

    python -m loraserve.tools.bench.shadow --demo var/demo [--clients 8] [--requests 48] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "Question: What should I do next?\nAnswer:"


def _store(demo: Path, root: Path) -> None:
    from loraserve.registry.passport import Passport, Status
    from loraserve.registry.store import Store

    for source, version, status in (("legal", "1", Status.ACTIVE), ("medical", "2", Status.STAGING)):
        target = root / "legal" / version
        shutil.copytree(demo / "adapters" / source / "1", target)
        passport = Passport.read(target)
        passport.name, passport.version, passport.status, passport.aliases = "legal", version, status, []
        passport.write(target)
    Store.local(root).reindex()


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


async def _measure(demo: Path, root: Path, clients: int, requests: int, rounds: int, new_tokens: int) -> dict:
    import grpc

    from loraserve.v1 import inference_pb2 as pb
    from loraserve.v1 import inference_pb2_grpc
    from loraserve.registry.rollout import Shadow
    from loraserve.registry.snapshot import now_iso
    from loraserve.registry.store import Store
    from loraserve.server.app import LoraServer
    from loraserve.server.settings import load

    server = LoraServer(load(dict(port=0, metrics_port=-1, http_port=0, model_path=demo / "base", adapters_dir=root),
                             env={}))
    await server.start()
    await server.load()
    store = Store.local(root)
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            ask = pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=new_tokens, ignore_eos=True)

            async def client(n: int, into: list[float]) -> None:
                for _ in range(n):
                    start = time.perf_counter()
                    reply = await stub.Generate(ask, timeout=300)
                    assert reply.adapter.version == "1"
                    into.append(time.perf_counter() - start)

            await asyncio.gather(*(client(2, []) for _ in range(clients)))  # warm: both versions' first use
            for i in range(rounds):
                for kind in (("off", "on"), ("on", "off"))[i % 2]:  # ABBA: a drift falls on both
                    store.shadow("legal", "2", Shadow(100, now_iso()) if kind == "on" else None)
                    await asyncio.gather(*(client(requests // clients, latencies[kind]) for _ in range(clients)))
            store.shadow("legal", "2", None)
        await asyncio.sleep(1)  # shadows still running finish or are counted
        sample = server.metrics.registry.get_sample_value
        outcomes = {o: sample("loraserve_shadow_requests_total", {"adapter": "legal", "version": "2", "outcome": o})
                    or 0 for o in ("match", "differ", "skipped", "shed", "error")}
    finally:
        await server.stop()
    off, on = _p95(latencies["off"]), _p95(latencies["on"])
    return {"clients": clients, "requests_per_round": requests, "rounds": rounds, "new_tokens": new_tokens,
            "p95_ms_no_shadow": round(off * 1e3, 1), "p95_ms_shadow": round(on * 1e3, 1),
            "p95_ratio": round(on / off, 3), "median_ms_no_shadow": round(statistics.median(latencies["off"]) * 1e3, 1),
            "median_ms_shadow": round(statistics.median(latencies["on"]) * 1e3, 1), "shadow_outcomes": outcomes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.tools.bench.shadow", description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("var/demo"), help="a `loraserve demo build` directory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="real requests per round of each kind")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loraserve-shadow-") as tmp:
        _store(args.demo, Path(tmp))
        result = asyncio.run(_measure(args.demo, Path(tmp), args.clients, args.requests, args.rounds,
                                      args.new_tokens))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
