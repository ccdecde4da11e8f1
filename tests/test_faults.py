"""Faults through the real engine: out-of-memory batches are split or fail alone, and the
server keeps serving."""

from __future__ import annotations

import grpc
import pytest
import torch

from conftest import ADAPTERS, PROMPT, ServerThread, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from runner.engine import EngineConfig, TorchEngine


class ScarceMemoryEngine(TorchEngine):
    """The real engine on a device that cannot hold a prefill of more than `fits` rows, and
    whose next `failing_decodes` decode steps hit the CPU allocator's out-of-memory error."""

    fits = 2
    failing_decodes = 0

    def _forward(self, ids, mask, positions, cache):
        if ids.shape[1] > 1 and ids.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if ids.shape[1] == 1 and self.failing_decodes:
            self.failing_decodes -= 1
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return super()._forward(ids, mask, positions, cache)


@pytest.fixture(scope="module")
def scarce(demo_dir):
    cfg = server_config(demo_dir, batch_wait_ms=50.0)
    srv = ServerThread(cfg, engine=ScarceMemoryEngine(EngineConfig(cfg.model_path)))
    with srv.channel() as channel:
        yield srv, inference_pb2_grpc.InferenceServiceStub(channel)
    srv.stop()


def _request(adapter, prompt=PROMPT):
    return pb.GenerateRequest(adapter_id=adapter, prompt=prompt, max_new_tokens=12)


def test_out_of_memory_prefill_is_split_and_every_answer_is_right(scarce, stub):
    srv, scarce_stub = scarce
    requests = [_request(a, f"{PROMPT} {i}") for i, a in enumerate((*ADAPTERS, "base") * 2)]
    alone = [stub.Generate(r, timeout=60).text for r in requests]  # the normal server, one at a time
    futures = [scarce_stub.Generate.future(r, timeout=60) for r in requests]
    assert [f.result().text for f in futures] == alone
    assert srv.server.scheduler.stats.oom_splits >= 1


def test_a_failed_decode_fails_its_batch_only_and_the_server_lives_on(scarce):
    srv, stub = scarce
    srv.server.engine.failing_decodes = 1
    with pytest.raises(grpc.RpcError) as failed:
        stub.Generate(_request("legal"), timeout=60)
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "OUT_OF_MEMORY" in str(failed.value.trailing_metadata())
    assert stub.Generate(_request("medical"), timeout=60).usage.output_tokens == 12
