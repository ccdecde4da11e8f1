"""The KV pool through the real engine: rows read only their own slots, the pool's size comes
from its budget, and a full pool makes requests wait, never fail."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from conftest import PROMPT, ServerThread, comparable, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from runner.engine import EngineConfig, TorchEngine
from scheduler.engine import Row
from scheduler.types import BASE, SamplingParams
from server.app import engine_config

PROMPTS = (PROMPT, "Question: Is this normal?\nAnswer:", "Hello there")


def _generate(engine: TorchEngine, slots: list[int], steps: int, poison: tuple[int, ...] = ()) -> list[list[int]]:
    """Greedy tokens of PROMPTS decoded together in `slots`; `poison` slots are filled with NaN
    after the prefill, as a failed neighbour could leave them (and its slot's next occupant finds them)."""
    async def run():
        prompts = [tuple(engine.encode(p)) for p in PROMPTS]
        generated = [[] for _ in prompts]
        rows = lambda: [Row(i, BASE, slot, prompts[i], generated[i], SamplingParams())  # noqa: E731
                        for i, slot in enumerate(slots)]
        results = await engine.prefill(rows())
        for t in (*engine._pool.keys, *engine._pool.values):
            t[list(poison)] = float("nan")
        for slot in poison:  # as if a sequence had filled the whole slot with NaN
            engine._pool.written[slot] = engine._pool.geometry.max_len
        for _ in range(steps):
            for g, r in zip(generated, results, strict=True):
                assert r.error is None
                g.append(r.token_id)
            results = await engine.decode(rows())
        return generated
    return asyncio.run(run())


@pytest.fixture(scope="module")
def engine(demo_dir):
    engine = TorchEngine(EngineConfig(demo_dir / "base", max_rows=6))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


def test_rows_never_read_a_poisoned_neighbour_slot(engine):
    clean = _generate(engine, [0, 1, 2], 12)  # consecutive slots: read as one view
    assert _generate(engine, [1, 3, 5], 12, poison=[0, 2, 4]) == clean  # scattered: gathered
    assert _generate(engine, [3, 4, 5], 12, poison=[0, 1, 2]) == clean
    # A slot a poisoned sequence used is cleared before its next occupant's prefill.
    assert _generate(engine, [0, 1, 2], 12) == clean


def test_long_prompts_prefilled_in_chunks_answer_as_in_one_piece(engine, demo_dir):
    clean = _generate(engine, [0, 1, 2], 12)
    # Chunks of 3 columns: each later chunk reads the keys earlier chunks wrote, and slots that
    # a poisoned sequence filled with NaN are cleared whole before the chunks read them.
    chunked = TorchEngine(EngineConfig(demo_dir / "base", max_rows=6, prefill_chunk_tokens=3))
    asyncio.run(chunked.start())
    try:
        assert _generate(chunked, [0, 1, 2], 12) == clean
        assert _generate(chunked, [3, 4, 5], 12, poison=[0, 1, 2]) == clean
        assert _generate(chunked, [0, 1, 2], 12) == clean
    finally:
        asyncio.run(chunked.close())


def test_pool_size_follows_its_budget_and_refuses_one_that_holds_nothing(demo_dir):
    probe = TorchEngine(EngineConfig(demo_dir / "base", max_rows=64, kv_cache_mib=1))
    asyncio.run(probe.start())
    per_slot = probe.kv_bytes() // probe.kv_slots
    assert probe.kv_slots == min(64, 2**20 // per_slot) and probe.kv_bytes() <= 2**20
    asyncio.run(probe.close())
    with pytest.raises(ValueError, match="holds no sequence"):
        asyncio.run(TorchEngine(EngineConfig(demo_dir / "base", max_model_len=512, kv_cache_mib=0.001)).start())


def test_a_full_pool_makes_requests_wait_not_fail(demo_dir, stub):
    cfg = comparable(server_config(demo_dir, max_batch_size=16))
    srv = ServerThread(cfg, engine=TorchEngine(dataclasses.replace(engine_config(cfg), max_rows=2)))
    requests = [pb.GenerateRequest(adapter_id=a, prompt=f"{PROMPT} {i}", max_new_tokens=10)
                for i, a in enumerate(("legal", "medical", "support", "base") * 2)]
    try:
        with srv.channel() as ch:
            two_slots = inference_pb2_grpc.InferenceServiceStub(ch)
            futures = [two_slots.Generate.future(r, timeout=60) for r in requests]
            assert [f.result().text for f in futures] == [stub.Generate(r, timeout=60).text for r in requests]
        assert srv.server.scheduler.stats.failed == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("extra, flags", [
    (dict(sliding_window=8), {}),  # a window inside the served length: refused
    (dict(attn_logit_softcapping=5.0), {}),
    (dict(sliding_window=8), {"max_model_len": 8}),  # served length within the window: full attention is exact
])
def test_attention_the_pool_does_not_implement_is_refused_not_approximated(demo_dir, tmp_path, extra, flags):
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(demo_dir / "base")
    for key, value in extra.items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo_dir / "base" / name).exists():
            shutil.copy(demo_dir / "base" / name, tmp_path / name)
    engine = TorchEngine(EngineConfig(tmp_path, **flags))
    if flags:
        asyncio.run(engine.start())
        asyncio.run(engine.close())
        return
    with pytest.raises(ValueError, match="sliding window|softcaps"):
        asyncio.run(engine.start())
