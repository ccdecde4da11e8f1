"""Lower-precision paths on CPU: bitsandbytes NF4 base weights, and bfloat16 compute."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ADAPTERS, PROMPT, ServerThread, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc


@pytest.fixture(scope="module")
def nf4_stub(demo_dir):
    srv = ServerThread(server_config(demo_dir, quantization="nf4"))
    with srv.channel() as ch:
        yield srv, inference_pb2_grpc.InferenceServiceStub(ch)
    srv.stop()


def test_nf4_model_is_quantized_and_serves_mixed_adapters(nf4_stub):
    srv, stub = nf4_stub
    import bitsandbytes as bnb

    model = srv.server.engine._model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    cases = [(a, PROMPT) for a in (*ADAPTERS, "base")] * 4
    alone = {a: stub.Generate(pb.GenerateRequest(adapter_id=a, prompt=p, max_new_tokens=20), timeout=60)
             for a, p in cases[:4]}
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: stub.Generate(
            pb.GenerateRequest(adapter_id=c[0], prompt=c[1], max_new_tokens=20), timeout=60), cases))
    for (adapter, _), resp in zip(cases, together):
        assert resp.adapter.id == adapter and resp.text == alone[adapter].text
    assert len({r.text for r in alone.values()}) == 4


def test_bfloat16_compute_serves_each_adapter_in_its_own_domain(demo_dir, stub):
    srv = ServerThread(server_config(demo_dir, dtype="bfloat16"))
    try:
        import torch

        assert srv.server.engine._model.dtype == torch.bfloat16
        with srv.channel() as ch:
            bf16 = inference_pb2_grpc.InferenceServiceStub(ch)
            texts = {a: bf16.Generate(pb.GenerateRequest(adapter_id=a, prompt=PROMPT, max_new_tokens=12),
                                      timeout=60).text for a in ADAPTERS}
        assert len(set(texts.values())) == len(ADAPTERS)
        # Each adapter's bfloat16 answer starts like its float32 one (the precision differs, the adapter does not).
        for adapter, text in texts.items():
            full = stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=12),
                                 timeout=60).text
            assert text.split()[:2] == full.split()[:2], (adapter, text, full)
    finally:
        srv.stop()
