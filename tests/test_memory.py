"""Load/evict churn through the real engine must not leak (peft delete paths are a known leak elsewhere)."""

from __future__ import annotations

import asyncio
import gc

from conftest import ADAPTERS
from runner.engine import EngineConfig, TorchEngine
from scheduler.cache import Budgets, Tier
from scheduler.tiers import AdapterTiers
from scheduler.types import AdapterRef

CYCLES = 2000
WARMUP = 200


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_2000_load_evict_cycles_keep_rss_flat(demo_dir):
    engine = TorchEngine(EngineConfig(demo_dir / "base"))
    refs = [AdapterRef(name, "1", str(demo_dir / "adapters" / name / "1")) for name in ADAPTERS]

    async def churn():
        await engine.start()
        size = max(engine.size_on_disk(r) for r in refs)
        # Room for one adapter per tier: every step reads one, drops one and demotes one.
        tiers = AdapterTiers(engine, Budgets(ram=size, vram=size))
        for i in range(CYCLES):
            await tiers.to_vram(refs[i % len(refs)])
            if i == WARMUP:
                gc.collect()
                start = rss_bytes()
        gc.collect()
        await engine.close()
        return start, rss_bytes(), tiers.cache.stats

    start, end, stats = asyncio.run(churn())
    assert stats[Tier.VRAM].evictions >= CYCLES - 1 and stats[Tier.RAM].loads >= CYCLES
    # One leaked adapter per cycle would be ~1800 x 140 KB = 250 MB.
    assert end - start < 24 * 2**20, f"RSS grew by {(end - start) / 2**20:.1f} MiB"
