"""`loraserve soak`: sustained mixed-adapter traffic with adapter churn against a running server.

Every answer is checked against the same request served alone before the soak starts (greedy
decoding makes it exact), so an answer from the wrong adapter, or a batch that corrupts a
row, shows up as a mismatch. Meanwhile a churn task keeps evicting adapters to disk and
warming others through the admin service, so loads, attaches and evictions race the traffic.
With --metrics-url the server's resident memory is sampled to check it stays flat.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field

import grpc

from loraserve.clients.client import AsyncLoraServeClient, RequestFailed, auth_metadata
from loraserve.v1 import admin_pb2 as apb
from loraserve.v1 import admin_pb2_grpc

PROMPTS = ("Question: What should I do next?\nAnswer:", "Question: Tell me more.\nAnswer:",
           "Question: What is the first step?\nAnswer:")
_RSS = re.compile(r"^process_resident_memory_bytes ([0-9.e+]+)$", re.M)


@dataclass
class SoakReport:
    requests: int = 0
    ok: int = 0
    mismatches: list[str] = field(default_factory=list)
    """Answers that differ from the same request served alone (wrong adapter or corrupted row)."""
    errors: Counter = field(default_factory=Counter)
    """Failed requests by gRPC code and reason; a healthy soak has none."""
    churn: Counter = field(default_factory=Counter)
    """Admin actions taken (and refused, e.g. ADAPTER_BUSY while an adapter is in use)."""
    rss_mib: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def rss_growth_mib(self) -> float:
        """Median of the last quarter of samples minus median of the second quarter (after warm-up)."""
        n = len(self.rss_mib)
        if n < 8:
            return 0.0
        return statistics.median(self.rss_mib[-n // 4:]) - statistics.median(self.rss_mib[n // 4:n // 2])

    def summary(self) -> dict:
        return {**asdict(self), "errors": dict(self.errors), "churn": dict(self.churn),
                "rss_mib": [round(x, 1) for x in self.rss_mib[:: max(1, len(self.rss_mib) // 20)]],
                "rss_growth_mib": round(self.rss_growth_mib, 1), "req_per_s": round(self.requests / self.wall_s, 1)}


def _rss_mib(url: str) -> float | None:
    with urllib.request.urlopen(url, timeout=5) as resp:
        found = _RSS.search(resp.read().decode())
    return float(found.group(1)) / 2**20 if found else None


async def run_soak(target: str, adapters: list[str], duration_s: float, *, concurrency: int = 32,
                   max_new_tokens: int = 8, churn_every_s: float = 0.5, metrics_url: str | None = None,
                   token: str | None = None, seed: int = 0) -> SoakReport:
    rng = random.Random(seed)
    report = SoakReport()
    work = [(a, p) for a in adapters for p in PROMPTS]
    meta = auth_metadata(token)
    async with AsyncLoraServeClient(target, timeout=120, token=token) as client, \
            grpc.aio.insecure_channel(target) as admin_channel:
        admin = admin_pb2_grpc.AdapterAdminServiceStub(admin_channel)
        expected = {}
        for adapter, prompt in work:  # one at a time: the reference answers
            expected[adapter, prompt] = (await client.generate(adapter, prompt, max_new_tokens=max_new_tokens)).text
        started = time.perf_counter()
        stop = started + duration_s

        async def traffic():
            while time.perf_counter() < stop:
                adapter, prompt = rng.choice(work)
                report.requests += 1
                try:
                    result = await client.generate(adapter, prompt, max_new_tokens=max_new_tokens)
                except RequestFailed as exc:
                    report.errors[f"{exc.code.name}/{exc.reason}"] += 1
                    continue
                if result.text != expected[adapter, prompt] or (adapter != "base" and result.adapter_id != adapter):
                    report.mismatches.append(f"{adapter}: {result.adapter_id} said {result.text!r}")
                else:
                    report.ok += 1

        async def first_accepted(action: str, call, make) -> None:
            """Try adapters in random order until the server accepts the action (one in use
            cannot be evicted, a full tier cannot take one more): every tick churns."""
            for name in rng.sample(names, len(names)):
                try:
                    await call(make(name), metadata=meta, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    report.churn[f"{action} refused {RequestFailed.from_rpc_error(exc).reason}"] += 1
                else:
                    report.churn[action] += 1
                    return

        names = [a for a in adapters if a != "base"]

        async def churn():
            while names and time.perf_counter() < stop:
                await asyncio.sleep(churn_every_s)
                await first_accepted("evicted", admin.EvictAdapter,
                                     lambda n: apb.EvictAdapterRequest(adapter_id=n, tier=apb.TIER_DISK))
                await first_accepted("warmed", admin.WarmAdapter,
                                     lambda n: apb.WarmAdapterRequest(adapter_id=n, tier=apb.TIER_VRAM))

        async def memory():
            while metrics_url and time.perf_counter() < stop:
                rss = await asyncio.to_thread(_rss_mib, metrics_url)
                if rss is not None:
                    report.rss_mib.append(rss)
                await asyncio.sleep(max(0.2, duration_s / 200))

        await asyncio.gather(*(traffic() for _ in range(concurrency)), churn(), memory())
        report.wall_s = time.perf_counter() - started
    return report


def add_soak_parser(sub) -> None:
    p = sub.add_parser("soak", help="sustained mixed traffic with adapter churn; checks every answer")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--adapters", default="legal,medical,support,base", help="comma-separated ids")
    p.add_argument("--duration", type=float, default=600.0, help="seconds [600]")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--churn-every", type=float, default=0.5, help="seconds between evict+warm actions")
    p.add_argument("--metrics-url", default="http://127.0.0.1:9464/metrics", help="'' to skip memory sampling")
    p.add_argument("--token", help="bearer token (an admin one, for the churn)")
    p.set_defaults(func=_soak_main)


def _soak_main(args) -> int:
    report = asyncio.run(run_soak(args.target, args.adapters.split(","), args.duration,
                                  concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                                  churn_every_s=args.churn_every, metrics_url=args.metrics_url or None,
                                  token=args.token))
    print(json.dumps(report.summary(), indent=2))
    return 0 if not report.mismatches and not report.errors else 1
