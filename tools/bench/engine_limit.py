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


def engine_limit(model_path: Path, plan: list[tuple[str, str, int]], batch_size: int, dtype: str = "auto",
                 deterministic: bool = False) -> dict:
    """`deterministic`: the batch-invariant engine (--deterministic), whose cost this measures."""
    from runner.engine import EngineConfig, TorchEngine

    async def measure() -> dict:
        engine = TorchEngine(EngineConfig(Path(model_path), dtype=dtype, max_rows=batch_size,
                                          deterministic=deterministic))
        await engine.start()
        try:
            prompts = [tuple(engine.encode(prompt)) for _, prompt, _ in plan]
            steps = [new for _, _, new in plan]

            async def run(batch: list[int]) -> None:
                generated = {i: [] for i in batch}
                rows = [Row(i, BASE, slot, prompts[i], generated[i], SamplingParams()) for slot, i in enumerate(batch)]
                for _ in range(max(steps[i] for i in batch)):
                    results = await (engine.decode(rows) if generated[batch[0]] else engine.prefill(rows))
                    for row, res in zip(rows, results, strict=True):
                        generated[row.seq_id].append(res.token_id)
                    rows = [Row(r.seq_id, BASE, r.kv_slot, r.prompt_ids, generated[r.seq_id], r.sampling, res.detok)
                            for r, res in zip(rows, results, strict=True)]

            await run([0])  # warm-up
            tokens, started = 0, time.perf_counter()
            for at in range(0, len(prompts), batch_size):
                batch = list(range(at, min(at + batch_size, len(prompts))))
                await run(batch)
                tokens += sum(steps[i] for i in batch)
            wall = time.perf_counter() - started
        finally:
            await engine.close()
        return {"requests": len(prompts), "tokens": tokens, "wall_s": round(wall, 3), "tok_per_s": round(tokens / wall, 1)}

    return asyncio.run(measure())
