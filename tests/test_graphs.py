"""The captured decode step (runner/graphs.py) run over its persistent buffers without capture:
rows joining and leaving, padded to buckets, mixed adapters and base rows, and adapters
attached after a bucket was first used, all give the tokens each request gets alone from the
eager engine. Capture itself needs CUDA and has not run in this suite."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import ADAPTERS, PROMPT, demo_ref
from runner.engine import EngineConfig, TorchEngine
from runner.graphs import DecodeGraphs
from scheduler.engine import Row
from scheduler.types import BASE, AdapterRef, SamplingParams

PROMPTS = (PROMPT, "Question: Is this normal?\nAnswer:", "Hello there", "Question: Why?\nAnswer:")


def _engine(demo_dir, mode: str, device: str = "cpu", dtype: str = "float32", **cfg) -> TorchEngine:
    engine = TorchEngine(EngineConfig(demo_dir / "base", device=device, dtype=dtype, max_rows=8, max_model_len=160,
                                      decode_graphs=mode, **cfg))
    asyncio.run(engine.start())
    return engine


async def _attach(engine: TorchEngine, ref: AdapterRef) -> None:
    if not ref.is_base and ref not in engine._slots:
        await engine.fetch(ref)
        await engine.attach(ref)


def drive(engine: TorchEngine, requests: list[tuple[AdapterRef, str, int, int]],
          attach_late: AdapterRef | None = None) -> list[list[int]]:
    """Requests (adapter, prompt, new tokens, step it joins at) through prefill and decode steps
    as the scheduler runs them: joiners are prefilled on their own, then decode with the rest;
    a row leaves (freeing its KV slot) when it has its tokens. `attach_late` is attached half-way."""
    async def run():
        for ref, *_ in requests:
            if ref != attach_late:
                await _attach(engine, ref)
        out: list[list[int]] = [[] for _ in requests]
        free, running = list(range(engine.kv_slots)), {}
        step = 0
        while step == 0 or running or any(len(out[i]) == 0 for i in range(len(requests))):
            if step == 6 and attach_late is not None:
                await _attach(engine, attach_late)
            joining = [i for i, r in enumerate(requests) if r[3] == step]
            if joining:
                rows = []
                for i in joining:
                    running[i] = free.pop(0)
                    ref, prompt, _, _ = requests[i]
                    rows.append(Row(i, ref, running[i], tuple(engine.encode(prompt)), out[i], SamplingParams()))
                for r in await engine.prefill(rows):
                    out[r.seq_id].append(r.token_id)
            decoding = [i for i in sorted(running) if i not in joining and len(out[i]) < requests[i][2]]
            if decoding:
                rows = [Row(i, requests[i][0], running[i], tuple(engine.encode(requests[i][1])), out[i],
                            SamplingParams()) for i in decoding]
                for r in await engine.decode(rows):
                    out[r.seq_id].append(r.token_id)
            for i in [i for i in running if len(out[i]) >= requests[i][2]]:
                free.append(running.pop(i))
                free.sort()
            step += 1
            if step > 500:
                raise AssertionError("the drive did not finish")
        return out
    return asyncio.run(run())


@pytest.fixture(scope="module")
def eager(demo_dir):
    engine = _engine(demo_dir, "off")
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def buffered(demo_dir):
    engine = _engine(demo_dir, "buffers")
    yield engine
    asyncio.run(engine.close())


def _workload(demo_dir) -> list[tuple[AdapterRef, str, int, int]]:
    names = ["base", *ADAPTERS]
    # Staggered joins and lengths: batches of 1..7 rows (buckets 1, 2, 4, 8 with padding rows),
    # rows leaving mid-batch, and lengths crossing the 64-position read bucket.
    return [(demo_ref(demo_dir, names[i % 4]), PROMPTS[i % len(PROMPTS)], 6 + (i * 11) % 60, (i * 5) % 23)
            for i in range(7)]


def test_buffered_decode_matches_each_request_served_alone(demo_dir, eager, buffered):
    requests = _workload(demo_dir)
    alone = [drive(eager, [(ref, prompt, n, 0)])[0] for ref, prompt, n, _ in requests]
    assert drive(buffered, requests) == alone
    assert drive(eager, requests) == alone
    assert buffered.decode_mode == "static buffers" and eager.decode_mode == "eager"
    # Several buckets were used: rows (1..8) x read lengths (64, 128) x LoRA rank (0 or the demo's).
    assert buffered._graphs.captured >= 5


def test_an_adapter_attached_after_its_bucket_was_first_used_is_applied(demo_dir, eager, buffered):
    late = demo_ref(demo_dir, "support")
    requests = [(demo_ref(demo_dir, "legal"), PROMPT, 30, 0), (late, PROMPTS[1], 20, 8), (BASE, PROMPTS[2], 25, 2)]
    alone = [drive(eager, [(ref, prompt, n, 0)])[0] for ref, prompt, n, _ in requests]
    if late in buffered._slots:
        asyncio.run(buffered.detach(late))
    assert drive(buffered, requests, attach_late=late) == alone


def test_padding_rows_write_only_the_scratch_slot(demo_dir, buffered):
    pool = buffered._pool
    assert pool.scratch == pool.slots == buffered.kv_slots
    for t in (*pool.keys, *pool.values):
        t[pool.scratch] = 7.0  # a sentinel: whatever padding rows leave there, no row reads it
    before = [t[:pool.slots].clone() for t in pool.keys]
    # Three rows in slots 0-2 decode in a bucket of four: one padding row.
    tokens = drive(buffered, [(BASE, PROMPTS[i], 3, 0) for i in range(3)])
    assert tokens == [drive(buffered, [(BASE, PROMPTS[i], 3, 0)])[0] for i in range(3)]
    for old, new in zip(before, pool.keys, strict=True):
        assert torch.equal(old[3:pool.slots], new[3:pool.slots])  # slots no row owned are untouched
    assert all(not (t[pool.scratch, :, 0] == 7.0).all() for t in pool.keys)  # the padding row wrote there


def test_buckets_round_rows_and_lengths_up(buffered):
    graphs = buffered._graphs
    max_len = buffered.max_context
    assert graphs.bucket(3, 10, 0) == (4, 64, 0)
    assert graphs.bucket(8, 65, 16) == (8, 128, 16)
    assert graphs.bucket(5, 65, 12) == (8, 128, 16)  # ranks round up too: columns past a rank are zero
    assert graphs.bucket(1, max_len, 4) == (1, max_len, 4)  # capped at the pool's length (160, not 256)
    assert graphs.bucket(1, 1, 100) == (1, 64, buffered.cfg.max_lora_rank)


def test_a_step_that_cannot_be_captured_falls_back_to_eager_decode(demo_dir, eager, caplog):
    class Uncapturable(DecodeGraphs):
        def _captured(self, step):
            raise RuntimeError("operation not permitted when stream is capturing")

    engine = _engine(demo_dir, "buffers")
    try:
        engine._graphs = g = Uncapturable(engine._model_step, engine._pool, engine._pad, capture=True,
                                          max_rank=engine.cfg.max_lora_rank)
        requests = [(BASE, PROMPT, 8, 0), (demo_ref(demo_dir, "legal"), PROMPTS[1], 8, 0)]
        assert drive(engine, requests) == drive(eager, requests)
        assert engine.decode_mode == "eager" and engine._graphs is None and g.captured == 0
        assert "decode runs eagerly from now on" in caplog.text
    finally:
        asyncio.run(engine.close())
