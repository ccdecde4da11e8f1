"""What only a CUDA device exercises (marked `gpu`: skipped elsewhere, with the reason). Run with
`pytest -m gpu` on the CUDA machine (docs/performance.md "Running the suite on CUDA"):

* decode replayed from captured CUDA graphs, rows joining and leaving, mixed adapters, an adapter
  attached (on the side stream) while other rows decode: scores within the stated tolerance of
  eager decode alone, and with --deterministic (graphs of one row) the tokens each request gets alone;
* bfloat16 serving, and NF4 weights through bitsandbytes' CUDA kernels;
* adapters read into page-locked memory and copied into their slots on the side stream;
* a prefill the real CUDA allocator cannot hold (a capped memory fraction) split until it fits.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import ADAPTERS, PROMPT, ServerThread, demo_ref, server_config
from forced import LogitsEngine, forced_scores
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.runner.config import EngineConfig
from test_generate import in_own_domain
from test_graphs import _engine, _workload, drive
from test_isolation import TOLERANCE, mixed_requests

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
QUANTIZATIONS = ["none", "nf4"]


def cuda_engine(demo_dir, **cfg) -> LogitsEngine:
    engine = LogitsEngine(EngineConfig(demo_dir / "base", device="cuda", dtype="bfloat16", max_rows=8,
                                       max_model_len=160, **cfg))
    asyncio.run(engine.start())
    return engine


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_captured_decode_scores_a_mixed_batch_as_eager_decode_scores_each_row_alone(demo_dir, quantization):
    captured = cuda_engine(demo_dir, quantization=quantization, decode_graphs="auto")
    eager = cuda_engine(demo_dir, quantization=quantization, decode_graphs="off")
    try:
        refs = [demo_ref(demo_dir, n) for n in (*ADAPTERS, "base", "medical", "legal")]
        requests = mixed_requests(captured, refs)
        together = forced_scores(captured, requests)
        alone = [forced_scores(eager, [r])[0] for r in requests]
        # bitsandbytes' 4-bit kernels may refuse capture: then decode falls back to eager, and says so.
        assert captured.decode_mode == "cuda graphs" or (quantization == "nf4" and captured.decode_mode == "eager")
        # Captured at start-up, every bucket up to max_rows 8 with LoRA on and off: none while serving.
        assert captured._graphs is None or captured._graphs.captured == 8
        assert captured._graphs is None or captured._graphs.captured >= 2
    finally:
        asyncio.run(captured.close())
        asyncio.run(eager.close())
    scale = max(float(a.abs().max()) for a in alone)
    worst = max(float((a - t).abs().max()) for a, t in zip(alone, together, strict=True))
    assert worst <= TOLERANCE["bfloat16", quantization] * scale, (worst, scale)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_deterministic_captured_decode_answers_each_request_as_alone(demo_dir, quantization):
    """Rows joining and leaving, padded buckets, an adapter attached half-way on the side stream
    while the others decode: every request's tokens are those it gets alone."""
    engine = _engine(demo_dir, "auto", device="cuda", dtype="bfloat16", quantization=quantization,
                     deterministic=True)
    try:
        requests = _workload(demo_dir)
        alone = [drive(engine, [(ref, prompt, n, 0)])[0] for ref, prompt, n, _ in requests]
        assert drive(engine, requests) == alone
        late = demo_ref(demo_dir, "support")
        if late in engine._adapters.attached:
            asyncio.run(engine.detach(late))
        assert drive(engine, requests, attach_late=late) == alone
        if engine._graphs is not None:  # captured: one row per graph in this mode
            assert engine.decode_mode == "cuda graphs" and {key[0] for key in engine._graphs._graphs} == {1}
    finally:
        asyncio.run(engine.close())


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_cuda_serves_bfloat16_and_nf4_with_each_adapter_in_its_own_domain(demo_dir, quantization):
    srv = ServerThread(server_config(demo_dir, device="cuda", dtype="auto", quantization=quantization))
    try:
        engine = srv.server.engine
        assert engine._device.type == "cuda" and engine._dtype == torch.bfloat16
        if quantization == "nf4":
            import bitsandbytes as bnb

            linear4 = [m for m in engine._model.modules() if isinstance(m, bnb.nn.Linear4bit)]
            assert linear4 and all(m.weight.device.type == "cuda" for m in linear4)
        cases = [*ADAPTERS, "base"] * 4
        with srv.channel() as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            with ThreadPoolExecutor(len(cases)) as pool:
                answers = list(pool.map(lambda a: stub.Generate(
                    pb.GenerateRequest(adapter_id=a, prompt=PROMPT, max_new_tokens=20), timeout=120), cases))
        for adapter, resp in zip(cases, answers):
            assert resp.adapter.id == adapter and in_own_domain(adapter, resp.text), (adapter, resp.text)
    finally:
        srv.stop()


def test_adapters_are_read_into_pinned_memory_and_land_whole_in_their_slots(demo_dir):
    engine = cuda_engine(demo_dir)
    ref = demo_ref(demo_dir, "medical")

    def slot_contents():  # on the engine thread, after the side stream's copy
        attached = engine._adapters.attached[ref]
        engine._adapters.await_copy(attached.slot)
        return {path: engine._adapters.layers[path].read(attached.slot, r) for path, r in attached.ranks.items()}

    async def scenario():
        await engine.fetch(ref)
        held = engine._adapters.ram[ref].modules
        assert all(a.is_pinned() and b.is_pinned() and a.dtype == torch.bfloat16 for a, b in held.values())
        expected = {path: (a.clone(), b.clone()) for path, (a, b) in held.items()}
        await engine.attach(ref)
        landed = await engine._run(slot_contents)
        await engine.demote(ref)  # back to page-locked RAM, read from the slot
        back = engine._adapters.ram[ref].modules
        return expected, landed, back

    try:
        expected, landed, back = asyncio.run(scenario())
    finally:
        asyncio.run(engine.close())
    assert landed.keys() == expected.keys() == back.keys()
    for path, (a, b) in expected.items():
        assert torch.equal(landed[path][0], a) and torch.equal(landed[path][1], b)
        assert back[path][0].is_pinned() and torch.equal(back[path][0], a) and torch.equal(back[path][1], b)


@pytest.fixture(scope="module")
def wide_base(demo_dir, tmp_path_factory):
    """A random Llama wide enough that a prefill's activations grow by tens of MiB per row (the
    demo's are too small for a memory cap to tell one row from eight), with the demo's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("wide-base")
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "base")
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def test_a_prefill_the_cuda_allocator_cannot_hold_is_split_and_every_request_served(demo_dir, wide_base, tmp_path):
    srv = ServerThread(server_config(demo_dir, model_path=wide_base, adapters_dir=tmp_path, device="cuda",
                                     max_batch_size=8, prefill_chunk_tokens=0, batch_wait_ms=200.0,
                                     join_delay_ms=200.0))
    rows = 8
    try:
        prompt = "Hello " * 200
        prompt = srv.server.engine._tokenizer.decode(srv.server.engine.encode(prompt)[:440], skip_special_tokens=True)
        request = pb.GenerateRequest(adapter_id="base", prompt=prompt, max_new_tokens=8, ignore_eos=True)
        with srv.channel() as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)

            def together(n: int) -> list[pb.GenerateResponse]:
                with ThreadPoolExecutor(n) as pool:
                    return list(pool.map(lambda _: stub.Generate(request, timeout=120), range(n)))

            def peak(n: int) -> int:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                together(n)
                return torch.cuda.max_memory_allocated() - before

            together(1)  # graphs captured, caches warm
            together(rows)
            one, eight = peak(1), peak(rows)
            assert eight > 4 * one, (one, eight)  # the step's activations dominate what it allocates
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            # Room for about three rows' prefill: eight at once cannot be held, one can.
            torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 3 * one) / total)
            splits = srv.server.scheduler.stats.oom_splits
            answers = together(rows)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        srv.stop()
    stats = srv.server.scheduler.stats
    assert stats.oom_splits > splits and stats.failed == 0
    assert [a.usage.output_tokens for a in answers] == [8] * rows
