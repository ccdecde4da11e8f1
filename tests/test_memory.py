"""Load/evict churn through the real engine must not leak (peft delete paths are a known leak elsewhere)."""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from conftest import ADAPTERS, TEST_DTYPE, fetch_on
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.scheduler.cache import Budgets, Tier
from loraserve.scheduler.errors import AdapterIncompatible
from loraserve.scheduler.tiers import AdapterTiers
from loraserve.scheduler.types import AdapterRef

CYCLES = 2000
WARMUP = 200


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_2000_load_evict_cycles_keep_rss_flat(demo_dir):
    engine = TorchEngine(EngineConfig(demo_dir / "base", dtype=TEST_DTYPE))
    refs = [AdapterRef(name, "1", str(demo_dir / "adapters" / name / "1")) for name in ADAPTERS]

    async def churn():
        await engine.start()
        held = await engine.fetch(refs[0])  # what the RAM tier holds of one, in the serving dtype
        engine.drop(refs[0])
        # Room for one adapter per tier (1.5 of them): every step reads one, drops one and demotes one.
        tiers = AdapterTiers(engine, Budgets(ram=held * 3 // 2, vram=engine.attached_bytes(refs[0]) * 3 // 2))
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


def test_the_vram_tier_counts_what_the_slot_stacks_really_hold(demo_dir):
    """Slots are reserved once at (max_loras, max_lora_rank); an attached adapter counts one
    whole slot, the budget is exactly the reserved stacks, and the count falls when it leaves."""
    engine = TorchEngine(EngineConfig(demo_dir / "base", max_loras=3, max_lora_rank=16))
    refs = [AdapterRef(name, "1", str(demo_dir / "adapters" / name / "1")) for name in ADAPTERS]

    async def scenario():
        await engine.start()
        reserved = engine.stack_bytes()
        tiers = AdapterTiers(engine, Budgets(ram=1 << 30, vram=engine.lora_budget_bytes))
        for ref in refs:
            await tiers.to_vram(ref)
        full = tiers.cache.used(Tier.VRAM)
        for ref in refs:
            await tiers.evict(ref, Tier.DISK)
        empty, after = tiers.cache.used(Tier.VRAM), engine.stack_bytes()
        await engine.close()
        return reserved, full, empty, after

    reserved, full, empty, after = asyncio.run(scenario())
    slot = engine.attached_bytes(refs[0])
    # Each slot holds (in + out) x rank per wrapped layer, and slot 0 stays zero for base rows.
    assert reserved == after == 4 * slot and full == 3 * slot == engine.lora_budget_bytes and empty == 0


def test_an_adapter_above_the_slots_rank_is_refused_at_load(demo_dir):
    engine = TorchEngine(EngineConfig(demo_dir / "base", max_lora_rank=4))  # the demo adapters are rank 8
    ref = AdapterRef("legal", "1", str(demo_dir / "adapters" / "legal" / "1"))

    with pytest.raises(AdapterIncompatible, match="rank 8"):
        fetch_on(engine, ref)


def test_a_verified_file_rewritten_after_its_check_is_hashed_again(demo_dir, tmp_path):
    import hashlib
    import shutil

    shutil.copytree(demo_dir / "adapters" / "legal" / "1", tmp_path / "legal")
    weights = tmp_path / "legal" / "adapter_model.safetensors"
    ref = AdapterRef("legal", "1", str(tmp_path / "legal"), hashlib.sha256(weights.read_bytes()).hexdigest())
    engine = TorchEngine(EngineConfig(demo_dir / "base"))

    async def scenario():
        await engine.start()
        try:
            await engine.fetch(ref)  # verified once
            engine.drop(ref)
            await engine.fetch(ref)  # unchanged: read again without a second hash
            engine.drop(ref)
            blob = bytearray(weights.read_bytes())
            blob[-1] ^= 1  # one flipped bit in the last tensor, same size
            weights.write_bytes(bytes(blob))
            await engine.fetch(ref)
        finally:
            await engine.close()

    with pytest.raises(AdapterIncompatible) as caught:
        asyncio.run(scenario())
    assert caught.value.reason == "WEIGHTS_HASH_MISMATCH"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_ram_tier_counts_bytes_in_the_dtype_it_holds(demo_dir, dtype):
    """A float32 file served in bfloat16 takes half its size in RAM: the tier reserves and
    records what the tensors hold (elements x element size in the serving dtype), so a budget of
    1.5 adapters holds one, whatever the dtype."""
    from safetensors.torch import load_file

    engine = TorchEngine(EngineConfig(demo_dir / "base", dtype=dtype))
    refs = [AdapterRef(name, "1", str(demo_dir / "adapters" / name / "1")) for name in ADAPTERS]
    weights = demo_dir / "adapters" / "legal" / "1" / "adapter_model.safetensors"
    held = sum(t.numel() for t in load_file(weights).values()) * getattr(torch, dtype).itemsize

    async def scenario():
        await engine.start()
        try:
            tiers = AdapterTiers(engine, Budgets(ram=held * 3 // 2, vram=1 << 30))
            for ref in refs:
                await tiers.to_ram(ref)
            return tiers.cache.used(Tier.RAM), tiers.cache.stats[Tier.RAM].evictions
        finally:
            await engine.close()

    used, evictions = asyncio.run(scenario())
    assert evictions == len(refs) - 1
    assert used == held < weights.stat().st_size * (0.55 if dtype == "bfloat16" else 1.0)
