"""Smoke tests for `adapters register`: load the adapter on the real base model and generate."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loraserve.registry.passport import SmokeTest
from loraserve.registry.snapshot import now_iso
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.scheduler.cache import Budgets, Tier
from loraserve.scheduler.errors import LoraServeError
from loraserve.scheduler.scheduler import Scheduler
from loraserve.scheduler.types import AdapterRef, GenerationRequest

PROMPTS = ("Question: What should I do next?\nAnswer:", "Question: Tell me more.\nAnswer:",
           "Question: Is this normal?\nAnswer:")


class SmokeTester:
    """Callable on an adapter version directory; loads the base model once for many adapters."""

    def __init__(self, model_path: Path, prompts: tuple[str, ...] = PROMPTS, max_new_tokens: int = 16,
                 quantization: str = "none"):
        # One row at a time and one adapter: a small KV pool and one LoRA slot, whatever the
        # model's context (a 128K-context model's default pool would not fit).
        self.engine = TorchEngine(EngineConfig(model_path=Path(model_path), quantization=quantization, max_rows=1,
                                               max_model_len=1024, max_loras=1, max_lora_rank=256))
        self.prompts, self.max_new_tokens = prompts, max_new_tokens
        self._started = False

    def __call__(self, version_dir: Path) -> SmokeTest:
        return asyncio.run(self._check(Path(version_dir)))

    async def _check(self, version_dir: Path) -> SmokeTest:
        if not self._started:
            await self.engine.start()
            self._started = True
        scheduler = Scheduler(self.engine, budgets=Budgets(ram=1 << 30, vram=1 << 30), batch_wait_s=0)
        loop = asyncio.create_task(scheduler.run())
        adapter = AdapterRef("smoke", str(abs(hash(version_dir)) % 10**9), str(version_dir))
        results = []
        try:
            for i, prompt in enumerate(self.prompts):
                req = GenerationRequest(f"smoke-{i}", adapter, tuple(self.engine.encode(prompt)), self.max_new_tokens)
                done = await scheduler.submit(req).result()
                results.append({"prompt": prompt, "output": done.text})
            passed = all(r["output"].strip() for r in results)
            return SmokeTest(passed, now_iso(), results, "" if passed else "an answer was empty")
        except LoraServeError as exc:
            return SmokeTest(False, now_iso(), results, exc.message)
        finally:
            loop.cancel()
            await scheduler.tiers.evict(adapter, Tier.DISK)
