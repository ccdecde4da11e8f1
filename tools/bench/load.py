"""The load generator: drives a running server over gRPC and records every request.

Workload: adapters drawn by Zipf(s) popularity (or uniformly) over N ids; arrivals either
closed-loop (C clients, each sending its next request when the last one ends) or open-loop
Poisson at a given rate; prompt and output lengths drawn from uniform ranges. Every request
streams, so time to first token is measured at the client.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import grpc

from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc

WORDS = ("the quick brown fox jumps over a lazy dog while many adapters wait for their turn in the "
         "queue and a scheduler batches them").split()


@dataclass(frozen=True)
class Workload:
    adapters: list[str]
    requests: int = 256
    zipf_s: float | None = 1.1
    """None means uniform popularity."""
    concurrency: int = 32
    rate: float | None = None
    """Requests per second (Poisson arrivals); None means closed-loop `concurrency` clients."""
    prompt_words: tuple[int, int] = (8, 24)
    new_tokens: tuple[int, int] = (32, 32)
    seed: int = 0

    def plan(self) -> list[tuple[str, str, int]]:
        """(adapter, prompt, max_new_tokens) for every request, reproducibly."""
        rng = random.Random(self.seed)
        n = len(self.adapters)
        weights = [1 / (k + 1) ** self.zipf_s for k in range(n)] if self.zipf_s else [1.0] * n
        order = self.adapters[:]
        rng.shuffle(order)  # popularity is not tied to the id's position
        picks = rng.choices(order, weights=weights, k=self.requests)
        return [(a, " ".join(rng.choices(WORDS, k=rng.randint(*self.prompt_words))),
                 rng.randint(*self.new_tokens)) for a in picks]


@dataclass
class Record:
    adapter: str
    ok: bool = False
    error: str = ""
    latency_s: float = 0.0
    ttft_s: float = 0.0
    """Until the first message with text: later than the first token when that token prints nothing."""
    server_ttft_s: float = 0.0
    """Queued, loaded and prefilled, by the server's own timings: right for random-weight models too."""
    output_tokens: int = 0
    load_source: str = ""
    load_ms: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    """Between consecutive stream messages with text (inter-token latency, as a client sees it:
    deltas a slow reader did not take yet arrive merged)."""


@dataclass
class RunResult:
    records: list[Record] = field(default_factory=list)
    wall_s: float = 0.0


async def _one(stub, adapter: str, prompt: str, max_new: int) -> Record:
    rec = Record(adapter)
    started = last = time.perf_counter()
    try:
        async for msg in stub.GenerateStream(pb.GenerateRequest(adapter_id=adapter, prompt=prompt,
                                                                max_new_tokens=max_new, ignore_eos=True),
                                             timeout=600):
            now = time.perf_counter()
            if not rec.ttft_s and (msg.text or msg.finish_reason):
                rec.ttft_s = now - started
            elif msg.text:
                rec.gaps_s.append(now - last)
            if msg.text:
                last = now
            if msg.finish_reason:
                rec.ok, rec.output_tokens = True, msg.usage.output_tokens
                rec.load_source = pb.LoadSource.Name(msg.adapter.load_source).removeprefix("LOAD_SOURCE_").lower()
                rec.load_ms = msg.timings.load_ms
                rec.server_ttft_s = (msg.timings.queue_ms + msg.timings.load_ms + msg.timings.prefill_ms) / 1e3
    except grpc.aio.AioRpcError as err:
        rec.error = err.code().name
    rec.latency_s = time.perf_counter() - started
    return rec


async def run(target: str, workload: Workload) -> RunResult:
    plan = workload.plan()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        started = time.perf_counter()
        if workload.rate:
            rng = random.Random(workload.seed + 1)
            tasks = []
            for item in plan:
                tasks.append(asyncio.create_task(_one(stub, *item)))
                await asyncio.sleep(rng.expovariate(workload.rate))
            records = list(await asyncio.gather(*tasks))
        else:
            queue = list(reversed(plan))
            records = []

            async def client():
                while queue:
                    records.append(await _one(stub, *queue.pop()))

            await asyncio.gather(*(client() for _ in range(workload.concurrency)))
        return RunResult(records, time.perf_counter() - started)
