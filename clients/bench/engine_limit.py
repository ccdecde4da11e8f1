"""The base model's compute limit without any serving: the real engine, in process, running the
same plan (base model, no adapters) in static batches of `batch_size`. No gRPC, no scheduler,
no client; so it bounds what any server can reach on this machine, and the naive baseline
shows how much per-request overhead batching has to win back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from scheduler.engine import Row
from scheduler.types import BASE, SamplingParams


def engine_limit(model_path: Path, plan: list[tuple[str, str, int]], batch_size: int, dtype: str = "auto") -> dict:
    from runner.engine import EngineConfig, TorchEngine

    async def measure() -> dict:
        engine = TorchEngine(EngineConfig(Path(model_path), dtype=dtype))
        await engine.start()
        try:
            rows = [Row(i, BASE, tuple(engine.encode(prompt)), SamplingParams()) for i, (_, prompt, _) in
                    enumerate(plan)]
            steps = [new for _, _, new in plan]
            await engine.prefill(rows[:1], [])  # warm-up
            await engine.release()
            tokens, started = 0, time.perf_counter()
            for at in range(0, len(rows), batch_size):
                batch = rows[at:at + batch_size]
                await engine.prefill(batch, [])
                for _ in range(max(steps[at:at + batch_size]) - 1):
                    await engine.decode([r.seq_id for r in batch])
                await engine.release()
                tokens += sum(steps[at:at + batch_size])
            wall = time.perf_counter() - started
        finally:
            await engine.close()
        return {"requests": len(rows), "tokens": tokens, "wall_s": round(wall, 3), "tok_per_s": round(tokens / wall, 1)}

    return asyncio.run(measure())
