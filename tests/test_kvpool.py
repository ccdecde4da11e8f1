"""The paged KV pool through the real engine: rows read only their own blocks (scattered, in any
order), FlexAttention answers as the reference gather does, shared prefix blocks and chunked
prefills answer as one piece, the pool's size comes from its budget, and a full pool makes
requests wait or be preempted, never fail."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from collections import OrderedDict

import pytest
import torch

from conftest import ADAPTERS, PROMPT, ServerThread, comparable, demo_ref, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.runner.loading import CPU_KV_DEFAULT_MIB
from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import BASE, SamplingParams
from loraserve.server.app import engine_config

PROMPTS = (PROMPT, "Question: Is this normal?\nAnswer:", "Hello there")
LONG = "Question: " + "the notice period under the contract and the terms that apply " * 4 + "?\nAnswer:"


def _generate(engine: TorchEngine, steps: int, order=None, poison: bool = False, prompts=PROMPTS,
              refs=None) -> list[list[int]]:
    """Greedy tokens of `prompts` decoded together, their blocks taken from a BlockManager in
    `order` (a permutation of the pool's blocks: scattered tables). `poison` fills every block no
    row holds with NaN, as failed neighbours could leave them."""
    async def run():
        order_ = order or list(range(engine.kv_blocks))
        manager = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
        manager._free = OrderedDict.fromkeys(order_)
        tokens = [tuple(engine.encode(p)) for p in prompts]
        adapters = refs or [BASE] * len(prompts)
        tables = [manager.admit("k", t) for t in tokens]
        generated = [[] for _ in tokens]
        rows = lambda: [Row(i, adapters[i], tuple(tables[i].blocks), tokens[i], generated[i], SamplingParams())  # noqa: E731
                        for i in range(len(tokens))]
        for i in range(len(tokens)):  # room for every step up front, so the poison below spares only them
            assert manager.grow(tables[i], len(tokens[i]) + steps + 1)
        if poison:
            held = {b for t in tables for b in t.blocks}
            engine._pool.kv[:, :, [b for b in range(engine.kv_blocks + 1) if b not in held]] = float("nan")
        results = await engine.prefill(rows())
        for _ in range(steps):
            for g, r in zip(generated, results, strict=True):
                assert r.error is None
                g.append(r.token_id)
            results = await engine.decode(rows())
        if poison:
            engine._pool.kv.zero_()
        return generated
    return asyncio.run(run())


@pytest.fixture(scope="module")
def engine(demo_dir):
    engine = TorchEngine(EngineConfig(demo_dir / "base", max_rows=6, kv_cache_mib=2, kv_block_size=4))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


def test_rows_read_only_their_own_blocks_wherever_they_lie(engine):
    clean = _generate(engine, 12)
    scattered = list(range(engine.kv_blocks))[::-1]
    assert _generate(engine, 12, order=scattered, poison=True) == clean
    shuffled = torch.randperm(engine.kv_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    assert _generate(engine, 12, order=shuffled, poison=True) == clean


def test_a_scrubbed_block_is_clean_for_its_next_owner(engine):
    clean = _generate(engine, 6)
    engine._pool.kv[:, :, :8] = float("nan")  # what a failed sequence may leave in the blocks it held
    asyncio.run(engine.scrub(list(range(8))))
    assert _generate(engine, 6) == clean
    assert torch.isfinite(engine._pool.kv).all()


def test_flex_attention_answers_as_the_reference_gather(demo_dir, engine):
    """The decode kernel CUDA runs, compiled here for the CPU, over scattered block tables."""
    flex = TorchEngine(EngineConfig(demo_dir / "base", max_rows=6, kv_cache_mib=2, kv_block_size=4,
                                    attention="flex", decode_graphs="buffers"))
    asyncio.run(flex.start())
    try:
        assert flex.attention_kernel == "flex" and engine.attention_kernel == "reference"
        refs = [demo_ref(demo_dir, name) for name in ("legal", "base", "medical")]
        for e in (engine, flex):
            for ref in refs:
                if not ref.is_base and ref not in e._adapters.attached:
                    asyncio.run(e.fetch(ref))
                    asyncio.run(e.attach(ref))
        order = list(range(flex.kv_blocks))[::-1]
        assert _generate(flex, 10, order=order, poison=True, refs=refs) == _generate(engine, 10, refs=refs)
    finally:
        asyncio.run(flex.close())


def _shared_prefix_answers(engine: TorchEngine, prompt: str, steps: int = 8) -> tuple[list[int], list[int], int]:
    """A prompt prefilled whole, then again taking its prefix's blocks from the first: both answers,
    and how many positions the second took from shared blocks."""
    async def run():
        manager = BlockManager(engine.kv_blocks, engine.kv_block_size)
        tokens = tuple(engine.encode(prompt))
        answers = []
        for seq in range(2):
            table = manager.admit("base@-", tokens)
            generated: list[int] = []
            row = lambda: Row(seq, BASE, tuple(table.blocks), tokens, generated, SamplingParams(),  # noqa: E731
                              cached=table.cached_tokens)
            result = (await engine.prefill([row()]))[0]
            manager.publish(table, "base@-", tokens)
            for _ in range(steps):
                generated.append(result.token_id)
                assert manager.grow(table, len(tokens) + len(generated))
                result = (await engine.decode([row()]))[0]
            answers.append(generated)
            cached = table.cached_tokens
        return answers[0], answers[1], cached
    return asyncio.run(run())


def test_a_prompt_on_shared_prefix_blocks_answers_as_when_computed_whole(engine):
    whole, shared, cached = _shared_prefix_answers(engine, LONG)
    assert cached >= 4 * engine.kv_block_size and shared == whole


def test_long_prompts_prefilled_in_chunks_answer_as_in_one_piece(engine, demo_dir):
    clean = _generate(engine, 12, prompts=(*PROMPTS, LONG))
    chunked = TorchEngine(EngineConfig(demo_dir / "base", max_rows=6, kv_cache_mib=2, kv_block_size=4,
                                       prefill_chunk_tokens=3))
    asyncio.run(chunked.start())
    try:
        assert _generate(chunked, 12, prompts=(*PROMPTS, LONG)) == clean
        assert _generate(chunked, 12, prompts=(*PROMPTS, LONG), order=list(range(chunked.kv_blocks))[::-1],
                         poison=True) == clean
    finally:
        asyncio.run(chunked.close())


def test_prefill_chunks_in_the_same_forward_as_decode_rows_answer_as_apart(engine, demo_dir):
    """Two rows decode (two adapters) while a long prompt (a third) prefills in chunks of 5 tokens
    within the same steps, each step one forward; then all three decode together. Every answer
    equals its prompt's answer alone, including the LoRA per packed token."""
    refs = [demo_ref(demo_dir, name) for name in ("legal", "medical", "legal")]
    for ref in dict.fromkeys(refs):
        if ref not in engine._adapters.attached:
            asyncio.run(engine.fetch(ref))
            asyncio.run(engine.attach(ref))
    prompts = (PROMPTS[0], PROMPTS[1], LONG)
    alone = [_generate(engine, 10, prompts=(p,), refs=[r])[0] for p, r in zip(prompts, refs)]
    forwards = []
    hook = engine._model.register_forward_pre_hook(lambda *_: forwards.append(1))

    async def run():
        manager = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
        tokens = [tuple(engine.encode(p)) for p in prompts]
        tables = [manager.admit("k", t) for t in tokens]
        for t, table in zip(tokens, tables):
            assert manager.grow(table, len(t) + 40)  # the decoding rows go on while the long one prefills
        generated = [[] for _ in tokens]
        row = lambda i, **kw: Row(i, refs[i], tuple(tables[i].blocks), tokens[i], generated[i],  # noqa: E731
                                  SamplingParams(), **kw)
        for i, result in enumerate(await engine.prefill([row(0), row(1)])):
            generated[i].append(result.token_id)
        done, mixed = 0, 0
        while len(generated[2]) < 10:
            rows = [row(0), row(1)]
            if done < len(tokens[2]):
                upto = min(done + 5, len(tokens[2]))
                rows.insert(1, row(2, cached=done, upto=upto, prefill=True))
                mixed += 1
            else:
                rows.append(row(2))
            before = len(forwards)
            results = await engine.step(rows)
            assert len(forwards) == before + 1  # one forward, whatever the step mixes
            for r, result in zip(rows, results, strict=True):
                assert r.seq_id == result.seq_id and result.error is None
                if not r.prefill or r.upto == len(tokens[2]):
                    generated[r.seq_id].append(result.token_id)
            if done < len(tokens[2]):
                done = upto
        return [g[:10] for g in generated], mixed

    try:
        answers, mixed = asyncio.run(run())
    finally:
        hook.remove()
    assert mixed >= 3 and answers == alone


def test_pool_size_follows_its_budget_and_refuses_one_that_holds_no_sequence(demo_dir):
    probe = TorchEngine(EngineConfig(demo_dir / "base", max_rows=64, kv_cache_mib=1, kv_block_size=16,
                                      max_model_len=256))
    asyncio.run(probe.start())
    per_block = probe.kv_bytes() // (probe.kv_blocks + 1)  # the scratch block is in the bytes too
    assert probe.kv_bytes() <= 2**20 and probe.kv_blocks == 2**20 // per_block - 1
    asyncio.run(probe.close())
    with pytest.raises(ValueError, match=r"holds no sequence of max_model_len 512 tokens, which needs 32 blocks"):
        asyncio.run(TorchEngine(EngineConfig(demo_dir / "base", kv_cache_mib=0.5)).start())


def _model_with(demo_dir, tmp_path, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(demo_dir / "base")
    for key, value in extra.items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo_dir / "base" / name).exists():
            shutil.copy(demo_dir / "base" / name, tmp_path / name)
    return tmp_path


def test_a_131072_position_model_starts_with_defaults_within_the_default_budget(demo_dir, tmp_path, caplog):
    """Every Llama-3.x says max_position_embeddings 131072: the pool is a budget of blocks, and
    max_model_len bounds one sequence only."""
    model = _model_with(demo_dir, tmp_path, max_position_embeddings=131072)
    engine = TorchEngine(EngineConfig(model))
    with caplog.at_level("INFO"):
        asyncio.run(engine.start())
    try:
        assert engine.max_context == 131072
        assert engine.kv_bytes() <= CPU_KV_DEFAULT_MIB * 2**20
        assert engine.kv_blocks * engine.kv_block_size >= 131072
        assert "KV pool:" in caplog.text and "blocks of 16 tokens" in caplog.text
        tokens = [engine.encode(PROMPT)]
        assert _generate(engine, 3, prompts=(PROMPT,)) and tokens
    finally:
        asyncio.run(engine.close())


@pytest.mark.parametrize("extra, flags", [
    (dict(sliding_window=8), {}),  # a window inside the served length: refused
    (dict(attn_logit_softcapping=5.0), {}),
    (dict(sliding_window=8), {"max_model_len": 8}),  # served length within the window: full attention is exact
])
def test_attention_the_pool_does_not_implement_is_refused_not_approximated(demo_dir, tmp_path, extra, flags):
    engine = TorchEngine(EngineConfig(_model_with(demo_dir, tmp_path, **extra), **flags))
    if flags:
        asyncio.run(engine.start())
        asyncio.run(engine.close())
        return
    with pytest.raises(ValueError, match="sliding window|softcaps"):
        asyncio.run(engine.start())


def _peak_running(srv: ServerThread, futures) -> int:
    peak = 0
    while not all(f.done() for f in futures):
        peak = max(peak, srv.server.scheduler.running)
        time.sleep(0.002)
    return peak


def test_48_short_streams_share_a_4_mib_pool_at_once(demo_dir):
    """A whole-context slot per sequence held 5 of these at once in 4 MiB (512 tokens each); blocks
    hold each stream's ~36 tokens. Every answer equals the same request served alone."""
    cfg = comparable(server_config(demo_dir, max_batch_size=64, kv_cache_mib=4.0, join_delay_ms=50.0))
    srv = ServerThread(cfg)
    names = ("base", *ADAPTERS)
    requests = [pb.GenerateRequest(adapter_id=names[i % 4], prompt=f"Question {i}: what now?\nAnswer:",
                                   max_new_tokens=24, ignore_eos=True) for i in range(48)]
    try:
        with srv.channel() as ch:
            client = inference_pb2_grpc.InferenceServiceStub(ch)
            alone = [client.Generate(r, timeout=60) for r in requests]
            futures = [client.Generate.future(r, timeout=120) for r in requests]
            peak = _peak_running(srv, futures)
            together = [f.result() for f in futures]
        assert [r.text for r in together] == [r.text for r in alone]
        assert all(r.usage.output_tokens == 24 for r in together)
        assert peak >= 16, peak
        assert srv.server.scheduler.stats.failed == 0
    finally:
        srv.stop()


def test_a_full_pool_preempts_and_resumes_without_changing_an_answer(demo_dir):
    """A pool of 2 sequences' worth of 512 positions, 8 requests that each grow to ~200 tokens:
    sequences are admitted on their prompts, the pool runs out as they grow, the newest are
    preempted and prefilled again later with what they had generated; none fails, and each answer
    equals the request served alone."""
    cfg = server_config(demo_dir, max_batch_size=16, kv_cache_mib=2.1, kv_block_size=16, dtype="float32")
    srv = ServerThread(cfg)
    names = ("base", *ADAPTERS)
    requests = [pb.GenerateRequest(adapter_id=names[i % 4], prompt=f"{PROMPT} {i}", max_new_tokens=190,
                                   ignore_eos=True) for i in range(8)]
    try:
        with srv.channel() as ch:
            client = inference_pb2_grpc.InferenceServiceStub(ch)
            alone = [client.Generate(r, timeout=120).text for r in requests]
            futures = [client.Generate.future(r, timeout=300) for r in requests]
            together = [f.result().text for f in futures]
        stats = srv.server.scheduler.stats
        assert stats.preemptions > 0 and stats.failed == 0
        assert together == alone
    finally:
        srv.stop()


def test_a_deterministic_server_reserves_blocks_and_never_preempts(demo_dir):
    cfg = server_config(demo_dir, max_batch_size=16, kv_cache_mib=2.1, deterministic=True)
    srv = ServerThread(cfg)
    requests = [pb.GenerateRequest(adapter_id="legal", prompt=f"{PROMPT} {i}", max_new_tokens=190, ignore_eos=True)
                for i in range(6)]  # 13 blocks each, 66 in the pool: some wait for others to finish
    try:
        with srv.channel() as ch:
            client = inference_pb2_grpc.InferenceServiceStub(ch)
            alone = [client.Generate(r, timeout=120).text for r in requests]
            futures = [client.Generate.future(r, timeout=300) for r in requests]
            assert [f.result().text for f in futures] == alone
        assert srv.server.scheduler.stats.preemptions == 0
        assert not srv.server.scheduler.kv_blocks.prefix_caching
    finally:
        srv.stop()


def test_flex_attention_on_cuda_takes_blocks_its_kernel_tiles():
    """FlexAttention's cuda decode kernel multiplies key tiles of one KV block with tl.dot, which
    Triton compiles only for K >= 16: smaller blocks take the reference kernel under auto, and flex
    asked for is refused at start-up. Elsewhere any block size goes (no device is touched here)."""
    from loraserve.runner.loading import attention_kernel

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [attention_kernel("auto", cuda, bs) for bs in (8, 16, 24, 32)] == ["reference", "flex", "reference", "flex"]
    with pytest.raises(ValueError, match="--attention flex on cuda needs --kv-block-size a power of two"):
        attention_kernel("flex", cuda, 8)
    assert attention_kernel("flex", cpu, 4) == "flex" and attention_kernel("auto", cpu, 16) == "reference"
    assert attention_kernel("reference", cuda, 8) == "reference"
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_kernel("paged", cpu, 16)


def test_engine_config_carries_the_pool_flags(demo_dir):
    cfg = server_config(demo_dir, kv_cache_mib=3.5, kv_block_size=8, gpu_memory_fraction=0.5, attention="flex")
    ec = engine_config(cfg)
    assert (ec.kv_cache_mib, ec.kv_block_size, ec.gpu_memory_fraction, ec.attention) == (3.5, 8, 0.5, "flex")
    assert json.dumps(dataclasses.asdict(ec), default=str)


def test_prompts_prefilled_over_several_steps_answer_as_in_one(demo_dir, stub):
    """A step budget of 7 tokens: prompts run in chunks over steps, between other rows' decode
    steps, each chunk reading the keys earlier ones wrote into its blocks."""
    cfg = comparable(server_config(demo_dir, max_num_batched_tokens=7))
    srv = ServerThread(cfg)
    requests = [pb.GenerateRequest(adapter_id=a, prompt=p, max_new_tokens=12)
                for a, p in (("legal", LONG), ("base", PROMPT), ("medical", LONG + " Why?"), ("support", PROMPTS[1]))]
    try:
        with srv.channel() as ch:
            client = inference_pb2_grpc.InferenceServiceStub(ch)
            futures = [client.Generate.future(r, timeout=120) for r in requests]
            assert [f.result().text for f in futures] == [stub.Generate(r, timeout=60).text for r in requests]
    finally:
        srv.stop()
