"""Lower-precision paths on CPU: bitsandbytes NF4 base weights, and bfloat16 compute. Their
batched answers agree with alone ones on scores within a tolerance (tests/test_isolation.py),
not token for token; --deterministic makes them equal (tests/test_deterministic.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ADAPTERS, PROMPT, ServerThread, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from test_generate import in_own_domain


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
    cases = [a for a in (*ADAPTERS, "base")] * 4
    batches = srv.server.scheduler.stats.batches
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda a: stub.Generate(
            pb.GenerateRequest(adapter_id=a, prompt=PROMPT, max_new_tokens=20), timeout=60), cases))
    for adapter, resp in zip(cases, together):
        assert resp.adapter.id == adapter and in_own_domain(adapter, resp.text), (adapter, resp.text)
    assert srv.server.scheduler.stats.batches - batches < len(cases) / 2  # they were batched


def test_bfloat16_compute_serves_each_adapter_in_its_own_domain(demo_dir):
    srv = ServerThread(server_config(demo_dir, dtype="bfloat16"))
    try:
        import torch

        assert srv.server.engine._model.dtype == torch.bfloat16
        with srv.channel() as ch:
            bf16 = inference_pb2_grpc.InferenceServiceStub(ch)
            texts = {a: bf16.Generate(pb.GenerateRequest(adapter_id=a, prompt=PROMPT, max_new_tokens=20),
                                      timeout=60).text for a in ADAPTERS}
        assert len(set(texts.values())) == len(ADAPTERS)
        for adapter, text in texts.items():
            assert in_own_domain(adapter, text), (adapter, text)
    finally:
        srv.stop()
