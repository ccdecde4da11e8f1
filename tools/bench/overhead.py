"""Scheduler overhead per request: the real Scheduler driving an engine that costs nothing."""

from __future__ import annotations

import asyncio
import time

from loraserve.scheduler.cache import Budgets
from loraserve.scheduler.engine import StepResult, Text
from loraserve.scheduler.policy import BatchLimits
from loraserve.scheduler.scheduler import Scheduler
from loraserve.scheduler.types import AdapterRef, GenerationRequest


class InstantEngine:
    """Answers every step at once; every adapter move is free."""

    eos_token_ids = frozenset({0})
    kv_blocks = 4096
    """Room for every row's blocks at any concurrency the bench uses: the pool never binds here."""
    kv_block_size = 16

    def bytes_once_read(self, adapter):
        return 1

    def attached_bytes(self, adapter):
        return 1

    async def fetch(self, adapter):
        return 1

    async def attach(self, adapter):
        pass

    async def demote(self, adapter):
        pass

    async def detach(self, adapter):
        pass

    def drop(self, adapter):
        pass

    async def scrub(self, blocks):
        pass

    async def prefill(self, rows):
        return [StepResult(r.seq_id, 7) for r in rows]

    async def decode(self, rows):
        return [StepResult(r.seq_id, 7) for r in rows]

    async def step(self, rows):
        return [StepResult(r.seq_id, 7) for r in rows]

    async def detokenize(self, jobs):
        return [Text("x", "", 0, 0) for _ in jobs]


def scheduler_overhead(requests: int = 2000, adapters: int = 100, new_tokens: int = 32,
                       concurrency: int = 32) -> dict:
    refs = [AdapterRef(f"a{i}", "1", f"/nowhere/a{i}") for i in range(adapters)]

    async def main() -> float:
        scheduler = Scheduler(InstantEngine(), BatchLimits(max_batch_size=concurrency), batch_wait_s=0,
                              budgets=Budgets(ram=1 << 30, vram=1 << 30))
        loop = asyncio.create_task(scheduler.run())
        pending = iter(range(requests))

        async def client():
            for i in pending:
                req = GenerationRequest(f"r{i}", refs[i % adapters], (1, 2, 3), new_tokens, ignore_eos=True)
                await scheduler.submit(req).result()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        loop.cancel()
        return wall

    wall = asyncio.run(main())
    return {"requests": requests, "new_tokens": new_tokens, "ms_per_request": wall / requests * 1e3,
            "us_per_token": wall / (requests * new_tokens) * 1e6}
