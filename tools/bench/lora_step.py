"""What LoRA adds to a step, in process: the real engine's decode step with every row on the base
model against the same rows spread over adapters, alternated, so both see the same machine state.

The serving benchmark (`loraserve bench`) compares two server runs minutes apart; on a shared
machine their throughput moves by more than the effect measured. Here the same batch (B rows of
one prompt, Zipf(1.1) adapter popularity over N synthetic q/k/v/o adapters of rank 16, all
attached) runs its decode steps base-only and with adapters in alternating rounds; what is
reported is each kind's median step over all rounds, and their ratio.

    python -m loraserve.tools.bench.lora_step [--batch 32] [--adapters 100] [--rounds 6] [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import BASE, AdapterRef, SamplingParams

PROMPT = "Question: what does the notice period in this contract mean for me?\nAnswer:"


def lora_step(model_path: Path, store: Path, batch: int = 32, adapters: int = 100, rounds: int = 6,
              steps: int = 20, device: str = "auto") -> dict:
    from loraserve.registry.identity import base_identity
    from loraserve.registry.store import Store
    from loraserve.runner.config import EngineConfig
    from loraserve.runner.engine import TorchEngine

    async def measure() -> dict:
        index = Store.local(store).snapshot()
        # What the server wraps by default.
        targets = index.served_targets(base_identity(Path(model_path)).revision)
        engine = TorchEngine(EngineConfig(Path(model_path), device=device, max_rows=batch,
                                          lora_target_modules=targets))
        await engine.start()
        try:
            names = random.Random(0).choices([f"bench{i}" for i in range(adapters)],
                                             [1 / (i + 1) ** 1.1 for i in range(adapters)], k=batch)
            refs = {}
            for name in dict.fromkeys(names):
                passport = index.active(name)
                refs[name] = AdapterRef(name, passport.version, str(Path(store) / name / passport.version),
                                        passport.weights_sha256)
                await engine.fetch(refs[name])
                await engine.attach(refs[name])
            prompt = tuple(engine.encode(PROMPT))
            kinds = {"base": [BASE] * batch, "lora": [refs[n] for n in names]}
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for _ in range(rounds):
                for kind, row_adapters in kinds.items():
                    blocks = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
                    tables = [blocks.admit(kind, prompt) for _ in range(batch)]
                    generated: list[list[int]] = [[] for _ in range(batch)]

                    def rows() -> list[Row]:
                        for table, g in zip(tables, generated):
                            assert blocks.grow(table, len(prompt) + len(g)), "the KV pool ran out"
                        return [Row(i, row_adapters[i], tuple(tables[i].blocks), prompt, generated[i],
                                    SamplingParams()) for i in range(batch)]

                    for step in range(steps + 1):
                        started = time.perf_counter()
                        results = await (engine.decode(rows()) if step else engine.prefill(rows()))
                        if step:
                            times[kind].append(time.perf_counter() - started)
                        for g, res in zip(generated, results, strict=True):
                            g.append(res.token_id)
        finally:
            await engine.close()
        base, lora = (statistics.median(times[k]) * 1e3 for k in kinds)
        return {"batch": batch, "adapters_in_batch": len(refs), "steps_each": len(times["base"]),
                "base_step_ms": round(base, 3), "lora_step_ms": round(lora, 3),
                "lora_over_base": round(lora / base, 3), "throughput_vs_base_only": round(base / lora, 3)}

    return asyncio.run(measure())


def main() -> None:
    from loraserve.tools.bench.cli import bench_model
    from loraserve.tools.bench.synth import make_store

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("var/bench"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    model = bench_model(args.out / "model")
    store = args.out / "lora-step-store"
    if not (store / "registry.json").exists():
        make_store(model, store, args.adapters)
    print(json.dumps(lora_step(model, store, args.batch, args.adapters, args.rounds, args.steps, args.device)))


if __name__ == "__main__":
    main()
