"""The captured decode step (runner/graphs.py) run over its persistent buffers without capture:
rows joining and leaving, padded to buckets, mixed adapters and base rows, and adapters
attached after a bucket was first used, all give the tokens each request gets alone from the
eager engine. Capture itself needs CUDA and has not run in this suite."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import ADAPTERS, PROMPT, demo_ref
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.runner.graphs import DecodeGraphs
from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import BASE, AdapterRef, SamplingParams

PROMPTS = (PROMPT, "Question: Is this normal?\nAnswer:", "Hello there", "Question: Why?\nAnswer:")


def _engine(demo_dir, mode: str, device: str = "cpu", dtype: str = "float32", **cfg) -> TorchEngine:
    # FlexAttention's cuda kernel needs blocks of at least 16 (runner/loading.attention_kernel).
    engine = TorchEngine(EngineConfig(demo_dir / "base", device=device, dtype=dtype, max_rows=8, max_model_len=160,
                                      kv_block_size=16 if device == "cuda" else 8, decode_graphs=mode, **cfg))
    asyncio.run(engine.start())
    return engine


async def _attach(engine: TorchEngine, ref: AdapterRef) -> None:
    if not ref.is_base and ref not in engine._adapters.attached:
        await engine.fetch(ref)
        await engine.attach(ref)


def drive(engine: TorchEngine, requests: list[tuple[AdapterRef, str, int, int]],
          attach_late: AdapterRef | None = None) -> list[list[int]]:
    """Requests (adapter, prompt, new tokens, step it joins at) through prefill and decode steps
    as the scheduler runs them: joiners are prefilled on their own, then decode with the rest,
    their block tables growing a block at a time; a row leaves (freeing its blocks) when it has its
    tokens. `attach_late` is attached half-way."""
    async def run():
        for ref, *_ in requests:
            if ref != attach_late:
                await _attach(engine, ref)
        out: list[list[int]] = [[] for _ in requests]
        blocks, running = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False), {}
        prompts = [tuple(engine.encode(r[1])) for r in requests]
        step = 0
        while step == 0 or running or any(len(out[i]) == 0 for i in range(len(requests))):
            if step == 6 and attach_late is not None:
                await _attach(engine, attach_late)
            joining = [i for i, r in enumerate(requests) if r[3] == step]
            if joining:
                rows = []
                for i in joining:
                    running[i] = blocks.admit("k", prompts[i])
                    rows.append(Row(i, requests[i][0], tuple(running[i].blocks), prompts[i], out[i], SamplingParams()))
                for r in await engine.prefill(rows):
                    out[r.seq_id].append(r.token_id)
            decoding = [i for i in sorted(running) if i not in joining and len(out[i]) < requests[i][2]]
            if decoding:
                for i in decoding:
                    assert blocks.grow(running[i], len(prompts[i]) + len(out[i]))
                rows = [Row(i, requests[i][0], tuple(running[i].blocks), prompts[i], out[i], SamplingParams())
                        for i in decoding]
                for r in await engine.decode(rows):
                    out[r.seq_id].append(r.token_id)
            for i in [i for i in running if len(out[i]) >= requests[i][2]]:
                blocks.release(running.pop(i))
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
    # rows leaving mid-batch, tables growing across blocks and blocks reused by later rows.
    return [(demo_ref(demo_dir, names[i % 4]), PROMPTS[i % len(PROMPTS)], 6 + (i * 11) % 60, (i * 5) % 23)
            for i in range(7)]


def test_buffered_decode_matches_each_request_served_alone(demo_dir, eager, buffered):
    requests = _workload(demo_dir)
    alone = [drive(eager, [(ref, prompt, n, 0)])[0] for ref, prompt, n, _ in requests]
    assert drive(buffered, requests) == alone
    assert drive(eager, requests) == alone
    assert buffered.decode_mode == "static buffers" and eager.decode_mode == "eager"
    # Several buckets were used: rows (1..8) x LoRA on/off, never the attended length.
    assert 3 <= buffered._graphs.captured <= 8


def test_an_adapter_attached_after_its_bucket_was_first_used_is_applied(demo_dir, eager, buffered):
    late = demo_ref(demo_dir, "support")
    requests = [(demo_ref(demo_dir, "legal"), PROMPT, 30, 0), (late, PROMPTS[1], 20, 8), (BASE, PROMPTS[2], 25, 2)]
    alone = [drive(eager, [(ref, prompt, n, 0)])[0] for ref, prompt, n, _ in requests]
    if late in buffered._adapters.attached:
        asyncio.run(buffered.detach(late))
    assert drive(buffered, requests, attach_late=late) == alone


def test_padding_rows_write_only_the_scratch_block(demo_dir, buffered):
    pool = buffered._pool
    assert pool.scratch == pool.blocks == buffered.kv_blocks
    pool.kv[:, :, pool.scratch] = 7.0  # a sentinel: whatever padding rows leave there, no row reads it
    pool.kv[:, :, 8:pool.blocks] = float("nan")  # the three rows below take blocks 0-5 only
    # Three rows decode in a bucket of four: one padding row.
    tokens = drive(buffered, [(BASE, PROMPTS[i], 3, 0) for i in range(3)])
    assert torch.isnan(pool.kv[:, :, 8:pool.blocks]).all()  # blocks no row owned are untouched
    assert not (pool.kv[:, :, pool.scratch, 0] == 7.0).all()  # the padding row wrote there
    pool.kv.zero_()
    assert tokens == [drive(buffered, [(BASE, PROMPTS[i], 3, 0)])[0] for i in range(3)]


def test_buckets_are_rows_rounded_up_and_lora_on_or_off(buffered):
    graphs = buffered._graphs
    assert graphs.bucket(3, False) == (4, False)
    assert graphs.bucket(8, True) == (8, True)
    assert graphs.bucket(5, True) == (8, True)
    assert graphs.bucket(9, True) == (8, True)  # capped at the batch size


def test_one_bucket_serves_adapters_of_every_rank(demo_dir, eager, buffered, tmp_path):
    """Buckets have no rank: each slot's rank comes from the layers' rank tables (read by the
    kernels on cuda, by the grouped path here), so a bucket first used by rank-8 adapters serves a
    rank-16 and a rank-2 adapter attached later, beside them."""
    wide, narrow = (_random_adapter(demo_dir, tmp_path / name, rank, targets) for name, rank, targets in
                    (("wide", 16, ["q_proj", "v_proj", "down_proj"]), ("narrow", 2, ["o_proj"])))
    legal = demo_ref(demo_dir, "legal")
    assert drive(buffered, [(legal, PROMPT, 6, 0), (BASE, PROMPTS[1], 6, 0)])  # the bucket of two, LoRA on
    requests = [(legal, PROMPT, 12, 0), (wide, PROMPTS[1], 12, 0), (narrow, PROMPTS[2], 12, 0),
                (BASE, PROMPTS[3], 12, 0)]
    alone = [drive(eager, [(ref, prompt, n, 0)])[0] for ref, prompt, n, _ in requests]
    assert drive(buffered, requests) == alone
    assert alone[1] != drive(eager, [(BASE, PROMPTS[1], 12, 0)])[0]  # the wide adapter changes the answer


def _random_adapter(demo_dir, out, rank: int, targets: list[str]) -> AdapterRef:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(rank)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_dir / "base"),
                           LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(out)
    return AdapterRef(out.name, "1", str(out))


def test_a_step_that_cannot_be_captured_falls_back_to_eager_decode(demo_dir, eager, caplog):
    class Uncapturable(DecodeGraphs):
        def _captured(self, step):
            raise RuntimeError("operation not permitted when stream is capturing")

    engine = _engine(demo_dir, "buffers")
    try:
        engine._graphs = g = Uncapturable(engine._model_step, engine._pool, engine._pad, capture=True,
                                          max_rows=8, kernel="reference")
        requests = [(BASE, PROMPT, 8, 0), (demo_ref(demo_dir, "legal"), PROMPTS[1], 8, 0)]
        assert drive(engine, requests) == drive(eager, requests)
        assert engine.decode_mode == "eager" and engine._graphs is None and g.captured == 0
        assert "decode runs eagerly from now on" in caplog.text
    finally:
        asyncio.run(engine.close())


def test_every_bucket_is_recorded_before_traffic_and_serves_as_on_first_use(demo_dir, eager):
    engine = _engine(demo_dir, "buffers")
    try:
        assert engine._graphs.capture_all(8) == 8  # rows 8, 4, 2, 1 x LoRA on, off
        assert set(engine._graphs._graphs) == {(r, lora) for r in (8, 4, 2, 1) for lora in (True, False)}
        requests = _workload(demo_dir)
        assert drive(engine, requests) == drive(eager, requests)
        assert engine._graphs.captured == 8  # nothing recorded while serving
    finally:
        asyncio.run(engine.close())
