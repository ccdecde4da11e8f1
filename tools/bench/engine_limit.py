"""The base model's compute limit without any serving: the real engine, in process, running the
same plan (base model, no adapters) in static batches of `batch_size`. No gRPC, no scheduler,
no client; so it bounds what any server can reach on this machine, and the naive baseline
shows how much per-request overhead batching has to win back.

KV blocks come from the scheduler's own BlockManager (scheduler/blocks.py), taken as the
scheduler takes them: a prompt's blocks at prefill, one more whenever a decode step crosses a
block boundary, all given back when the batch ends. Prefix sharing is off, so every prompt is
computed in full (the plan repeats prompts; sharing them would measure the cache, not compute)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import BASE, SamplingParams


def engine_limit(model_path: Path, plan: list[tuple[str, str, int]], batch_size: int, dtype: str = "auto",
                 deterministic: bool = False) -> dict:
    """`deterministic`: the batch-invariant engine (--deterministic), whose cost this measures."""
    from loraserve.runner.config import EngineConfig
    from loraserve.runner.engine import TorchEngine

    async def measure() -> dict:
        engine = TorchEngine(EngineConfig(Path(model_path), dtype=dtype, max_rows=batch_size,
                                          deterministic=deterministic))
        await engine.start()
        try:
            prompts = [tuple(engine.encode(prompt)) for _, prompt, _ in plan]
            steps = [new for _, _, new in plan]
            blocks = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)

            async def run(batch: list[int]) -> None:
                generated = {i: [] for i in batch}
                tables = {i: blocks.admit("base", prompts[i]) for i in batch}
                try:
                    if any(t is None for t in tables.values()):
                        raise RuntimeError(f"the KV pool ({engine.kv_blocks} blocks) cannot hold a batch of "
                                           f"{len(batch)}")
                    for _ in range(max(steps[i] for i in batch)):
                        decode = bool(generated[batch[0]])
                        for i in batch if decode else ():
                            # The step writes position len(prompt) + len(generated) - 1, as the scheduler grows it.
                            if not blocks.grow(tables[i], len(prompts[i]) + len(generated[i])):
                                raise RuntimeError(f"the KV pool ({engine.kv_blocks} blocks) ran out")
                        rows = [Row(i, BASE, tuple(tables[i].blocks), prompts[i], generated[i], SamplingParams())
                                for i in batch]
                        results = await (engine.decode(rows) if decode else engine.prefill(rows))
                        for row, res in zip(rows, results, strict=True):
                            generated[row.seq_id].append(res.token_id)
                finally:
                    for table in tables.values():
                        if table is not None:
                            blocks.release(table)

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
