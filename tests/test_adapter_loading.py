"""Cold loads through the real engine: limited, single-flight, isolated failures."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import ADAPTERS, PROMPT, ServerThread, clone_adapter, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.runner.engine import TorchEngine
from loraserve.server.app import engine_config
from test_generate import details


class SlowReadEngine(TorchEngine):
    """The real engine with disk reads stretched to 150 ms, counting reads and their overlap."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reads: Counter[str] = Counter()
        self.probes: Counter[str] = Counter()  # header reads sizing the RAM reservation
        self.reading = self.peak = 0
        self._lock = threading.Lock()
        self._real_read, self._adapters.read = self._adapters.read, self._read  # what the loader threads run

    def bytes_once_read(self, adapter):
        with self._lock:
            self.probes[adapter.id] += 1
        return super().bytes_once_read(adapter)

    def _read(self, adapter):
        with self._lock:
            self.reads[adapter.id] += 1
            self.reading += 1
            self.peak = max(self.peak, self.reading)
        try:
            time.sleep(0.15)
            return self._real_read(adapter)
        finally:
            with self._lock:
                self.reading -= 1


@pytest.fixture(scope="module")
def store(demo_dir, tmp_path_factory):
    """Ten copies of the demo adapters under new ids, plus one with corrupt weights."""
    root = tmp_path_factory.mktemp("adapters")
    sources = {}
    for i in range(10):
        sources[f"copy{i}"] = ADAPTERS[i % len(ADAPTERS)]
        clone_adapter(demo_dir, root, sources[f"copy{i}"], f"copy{i}")
    garbage = b"not a safetensors file"
    # Registered with this very file's hash: it passes the hash check and fails to load.
    corrupt = clone_adapter(demo_dir, root, "legal", "corrupt", weights_sha256=hashlib.sha256(garbage).hexdigest())
    (corrupt / "adapter_model.safetensors").write_bytes(garbage)
    (clone_adapter(demo_dir, root, "legal", "noweights") / "adapter_model.safetensors").unlink()
    for name in ADAPTERS:
        clone_adapter(demo_dir, root, name, name)
    return root, sources


@pytest.fixture(scope="module")
def slow_server(demo_dir, store):
    cfg = server_config(demo_dir, adapters_dir=store[0])
    engine = SlowReadEngine(engine_config(cfg))
    srv = ServerThread(cfg, engine=engine)
    with srv.channel() as ch:
        yield srv, engine, inference_pb2_grpc.InferenceServiceStub(ch)
    srv.stop()


def ask(stub, adapter, tokens=16):
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=tokens), timeout=60)


def test_ten_cold_adapters_at_once_load_two_at_a_time_once_each(slow_server, store):
    srv, engine, stub = slow_server
    _, sources = store
    expected = {name: ask(stub, name).text for name in ADAPTERS}
    engine.peak = 0
    cases = sorted(sources) * 3
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda a: ask(stub, a), cases))
    assert engine.peak == 2
    assert all(engine.reads[name] == 1 for name in sources)
    for name, resp in zip(cases, answers):
        assert resp.adapter.id == name and resp.text == expected[sources[name]]
    sources_seen = Counter(pb.LoadSource.Name(r.adapter.load_source) for r in answers)
    assert sources_seen["LOAD_SOURCE_DISK"] >= 10
    disk = [r for r in answers if r.adapter.load_source == pb.LOAD_SOURCE_DISK]
    assert all(r.timings.load_ms >= 150 for r in disk)


def test_corrupt_adapter_fails_only_its_requests_and_is_not_retried_in_a_loop(slow_server):
    srv, engine, stub = slow_server
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as caught:
            ask(stub, "corrupt")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        info, _ = details(caught.value)
        assert info.reason == "ADAPTER_LOAD_FAILED" and info.metadata["adapter_id"] == "corrupt@1"
        assert "adapter 'corrupt@1' failed to load" in caught.value.details()  # the version, as every such error
    # Its header is already unreadable: one look at the file, then the failure is remembered.
    assert engine.probes["corrupt"] == 1 and engine.reads["corrupt"] == 0
    assert ask(stub, "legal").adapter.id == "legal"


def test_missing_weights_file_is_a_clear_load_failure(slow_server):
    _, _, stub = slow_server
    with pytest.raises(grpc.RpcError) as caught:
        ask(stub, "noweights")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(caught.value)[0].reason == "ADAPTER_LOAD_FAILED"
    assert "adapter_model.safetensors" in caught.value.details()
