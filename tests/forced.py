"""Teacher-forced logits from the real engine, for tests where a batch may change a row's float
results (bfloat16, bitsandbytes 4-bit, a GPU's kernels chosen by shape): the same token sequence
is fed to a row alone and inside a mixed batch, and the scores it gets at every position are
compared, instead of greedy text that one near-tie can send elsewhere for good."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from loraserve.runner.engine import TorchEngine
from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import AdapterRef, SamplingParams


class LogitsEngine(TorchEngine):
    """The real engine, keeping the float32 scores each step computed for each row before
    sampling (by seq_id, one [vocab] tensor per step)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scores: dict[int, list[torch.Tensor]] = {}

    def _sample(self, rows, logits):
        for row, scores in zip(rows, logits, strict=True):
            self.scores.setdefault(row.seq_id, []).append(scores.detach().to("cpu", copy=True))
        return super()._sample(rows, logits)


@dataclass(frozen=True)
class Forced:
    adapter: AdapterRef
    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    """Fed after the prompt whatever the model would have chosen (teacher forcing)."""


def forced_scores(engine: LogitsEngine, requests: list[Forced]) -> list[torch.Tensor]:
    """[len(tokens), vocab] scores per request, all of them run as one batch (prefill together,
    then decode steps together): position k scores the token after prompt + tokens[:k]."""
    async def run() -> list[torch.Tensor]:
        for r in requests:
            if not r.adapter.is_base and r.adapter not in engine._adapters.attached:
                await engine.fetch(r.adapter)
                await engine.attach(r.adapter)
        engine.scores.clear()
        manager = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
        tables = []
        for r in requests:  # each row's whole length up front: no step waits for a block
            tables.append(manager.admit("forced", r.prompt))
            assert tables[-1] is not None and manager.grow(tables[-1], len(r.prompt) + len(r.tokens))
        rows = [Row(i, r.adapter, tuple(tables[i].blocks), r.prompt, (), SamplingParams())
                for i, r in enumerate(requests)]
        await engine.prefill(rows)
        for k in range(1, max(len(r.tokens) for r in requests)):
            live = [Row(i, r.adapter, tuple(tables[i].blocks), r.prompt, r.tokens[:k], SamplingParams())
                    for i, r in enumerate(requests) if k < len(r.tokens)]
            await engine.decode(live)
        return [torch.stack(engine.scores[i]) for i in range(len(requests))]
    return asyncio.run(run())
