"""Serving adapters from an S3 bucket (moto's server on loopback, behind a counting proxy):
registered and promoted with the CLI, answers equal to the local store's, hot reload from the
index's ETag, and the origin's faults failing only their own requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import ADAPTERS, PROMPT, REPO, ServerThread, server_config
from loraserve.v1 import admin_pb2 as apb
from loraserve.v1 import admin_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.registry.identity import base_identity
from loraserve.registry.origin import open_store
from loraserve.registry.passport import SmokeTest
from s3util import Proxy, credentials_checked, s3_client
from test_generate import details

BUCKET = "served-adapters"
STORE = f"s3://{BUCKET}/prod"
NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
FAULTY = ("ghost", "corrupt", "stalled", "denied", "cold1", "cold2", "cold3")
"""Copies of legal registered in-process (smoke test taken as passed) for the fault tests."""


def cli(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "loraserve.tools.cli", "adapters", "--store", STORE, "--s3-endpoint-url", endpoint,
                           *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=os.environ)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def bucket_store(demo_dir, moto_endpoint):
    """The demo's three adapters registered (smoke-tested) and promoted with the CLI."""
    s3_client(moto_endpoint).create_bucket(Bucket=BUCKET)
    for name in ADAPTERS:
        cli(moto_endpoint, "register", str(demo_dir / "adapters" / name / "1"), "--name", name,
            "--model-path", str(demo_dir / "base"))
        cli(moto_endpoint, "promote", name, "1")
    store = open_store(STORE, endpoint_url=moto_endpoint)
    base = base_identity(demo_dir / "base")
    for name in FAULTY:
        store.register(demo_dir / "adapters" / "legal" / "1", name, base,
                       lambda _: SmokeTest(True, "now", [{"prompt": "p", "output": "o"}]))
        store.promote(name, "1")
    return store


@pytest.fixture(scope="module")
def remote(demo_dir, bucket_store, moto_endpoint, tmp_path_factory):
    proxy = Proxy(moto_endpoint, stall=lambda method, path: method == "GET" and "/stalled/1/adapter_model" in path)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    srv = ServerThread(server_config(
        demo_dir, adapters_dir=STORE, s3_endpoint_url=proxy.endpoint,
        disk_cache_dir=tmp_path_factory.mktemp("disk-cache"), index_poll_s=0.2, origin_timeout_s=1.5,
        origin_retries=1, failed_load_backoff_s=0.0, max_concurrent_loads=1), tracer_provider=provider)
    with srv.channel() as ch:
        yield srv, proxy, exporter, inference_pb2_grpc.InferenceServiceStub(ch)
    srv.stop()
    proxy.stop()


def ask(stub, adapter, **kw):
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, **{"max_new_tokens": 12, **kw}),
                         timeout=60)


def refused(stub, adapter) -> tuple[grpc.StatusCode, object]:
    with pytest.raises(grpc.RpcError) as caught:
        ask(stub, adapter)
    return caught.value.code(), details(caught.value)[0]


def metrics(srv) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10).read().decode()


def sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_answers_equal_the_local_store_and_say_they_came_from_remote(remote, stub):
    srv, proxy, exporter, remote_stub = remote
    for name in ADAPTERS:
        local = ask(stub, name)
        first, again = ask(remote_stub, name), ask(remote_stub, name)
        assert first.text == again.text == local.text, name
        assert (first.adapter.id, first.adapter.version) == (name, "1")
        assert first.adapter.load_source == pb.LOAD_SOURCE_REMOTE and first.timings.load_ms > 0
        assert again.adapter.load_source == pb.LOAD_SOURCE_VRAM
        assert proxy.count("GET", f"/{name}/1/adapter_model.safetensors") == 1
    text = metrics(srv)
    size = (srv.server.origin.store.version_dir("legal", "1") / "adapter_model.safetensors").stat().st_size
    assert sample(text, "loraserve_origin_fetch_bytes_total") >= 3 * size
    assert sample(text, 'loraserve_origin_fetches_total{result="downloaded"}') >= 3
    assert sum(sample(text, f'loraserve_adapter_load_seconds_count{{adapter="{name}",source="remote"}}')
               for name in ADAPTERS) >= 3
    assert sample(text, "loraserve_disk_cache_adapters") >= 3 and sample(text, "loraserve_disk_cache_budget_bytes") > 0
    loads = [s for s in exporter.get_finished_spans() if s.name == "adapter.load"
             and s.attributes["loraserve.adapter.source"] == "remote"]
    assert loads and all(s.attributes["loraserve.adapter.fetch_bytes"] >= size for s in loads)


def test_an_adapter_evicted_to_disk_is_read_from_the_disk_cache_not_fetched(remote):
    srv, proxy, _, stub = remote
    ask(stub, "support")
    with srv.channel() as ch:
        admin_pb2_grpc.AdapterAdminServiceStub(ch).EvictAdapter(
            apb.EvictAdapterRequest(adapter_id="support", tier=apb.TIER_DISK), timeout=30)
    before = proxy.count("GET", "/support/1/adapter_model.safetensors")
    r = ask(stub, "support")
    assert r.adapter.load_source == pb.LOAD_SOURCE_DISK
    assert proxy.count("GET", "/support/1/adapter_model.safetensors") == before


def test_remote_fetches_share_the_load_limit_and_are_single_flight(remote):
    srv, proxy, _, stub = remote
    answers, errors = [], []

    def one(name):
        try:
            answers.append(ask(stub, name))
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(f"cold{i % 3 + 1}",)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(answers) == 9 and len({a.text for a in answers}) == 1
    assert [proxy.count("GET", f"/cold{i}/1/adapter_model.safetensors") for i in (1, 2, 3)] == [1, 1, 1]
    assert proxy.weights_peak == 1  # --max-concurrent-loads 1: one download at a time
    assert srv.server.scheduler.tiers.loads.peak == 1


def test_promote_and_rollback_in_the_bucket_are_picked_up_and_in_flight_requests_keep_their_version(
        remote, stub, demo_dir, moto_endpoint, bucket_store):
    srv, _, _, remote_stub = remote
    v1 = ask(remote_stub, "legal")
    cli(moto_endpoint, "register", str(demo_dir / "adapters" / "medical" / "1"), "--name", "legal",
        "--model-path", str(demo_dir / "base"))
    stream = remote_stub.GenerateStream(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=100,
                                                           ignore_eos=True), timeout=120)
    first = next(stream)
    bucket_store.promote("legal", "2")  # while the stream runs

    def serving(version):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = ask(remote_stub, "legal")
            if r.adapter.version == version:
                return r
            time.sleep(0.1)
        raise AssertionError(f"legal@{version} never served")

    v2 = serving("2")
    assert v2.text == ask(stub, "medical").text != v1.text
    rest = list(stream)
    assert rest[-1].adapter.version == "1"
    expected = ask(stub, "legal", max_new_tokens=100, ignore_eos=True).text
    assert first.text + "".join(m.text for m in rest) == expected
    cli(moto_endpoint, "rollback", "legal")
    assert serving("1").text == v1.text
    assert sample(metrics(srv), "loraserve_index_reloads_total") >= 2


def test_an_index_that_does_not_validate_is_refused_and_the_last_valid_one_serves(remote, bucket_store):
    """As the local store's reader (tests/test_index_faults.py): the bucket's index overwritten
    with nonsense, then with two active versions of one name, then deleted."""
    srv, _, _, stub = remote
    key = bucket_store.s3.key("registry.json")
    good, _ = bucket_store.s3.get(key)
    entries = json.loads(good)["adapters"]
    two_active = json.dumps({"adapters": [{**e, "status": "active"} if e["name"] == "legal" else e
                                          for e in entries]}).encode()
    expected = ask(stub, "legal")
    with srv.channel() as ch:
        admin = admin_pb2_grpc.AdapterAdminServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)

        def refusal() -> tuple[int, str, int]:
            st = admin.GetCacheStats(apb.GetCacheStatsRequest(), timeout=10)
            status = health.Check(health_pb2.HealthCheckRequest(service="loraserve.registry"), timeout=5).status
            return st.registry_reload_errors, st.registry_index_error, status

        before = refusal()[0]
        try:
            for n, (damage, why) in enumerate(((lambda: bucket_store.s3.put(key, b"[]"), "'adapters' list"),
                                               (lambda: bucket_store.s3.put(key, two_active), "2 active versions"),
                                               (lambda: bucket_store.s3.delete(key), "registry.json is gone")), 1):
                damage()
                deadline = time.monotonic() + 20
                while refusal()[0] < before + n and time.monotonic() < deadline:
                    time.sleep(0.1)
                errors, why_refused, status = refusal()
                assert errors == before + n and why in why_refused and status == NOT_SERVING, why_refused
                r = ask(stub, "legal")
                assert (r.adapter.version, r.text) == (expected.adapter.version, expected.text)
        finally:
            bucket_store.s3.put(key, good)
        deadline = time.monotonic() + 20
        while refusal()[1:] != ("", SERVING) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert refusal()[1:] == ("", SERVING)
    assert sample(metrics(srv), "loraserve_registry_reload_errors_total") == before + 3


def test_a_missing_object_fails_only_its_requests(remote, bucket_store):
    srv, proxy, _, stub = remote
    bucket_store.s3.delete(bucket_store.s3.key("ghost", "1", "adapter_model.safetensors"))
    code, info = refused(stub, "ghost")
    assert code is grpc.StatusCode.UNAVAILABLE and info.reason == "ADAPTER_LOAD_FAILED"
    assert info.metadata["origin_code"] in ("404", "NoSuchKey") and info.metadata["origin"] == STORE
    assert ask(stub, "legal").text  # everyone else is served


def test_a_corrupted_object_is_discarded_never_served(remote, bucket_store):
    srv, proxy, _, stub = remote
    key = bucket_store.s3.key("corrupt", "1", "adapter_model.safetensors")
    good, _ = bucket_store.s3.get(key)
    bucket_store.s3.put(key, good[:-4] + b"\x00\x00\x80\x7f")  # same length, last float now inf
    code, info = refused(stub, "corrupt")
    assert code is grpc.StatusCode.FAILED_PRECONDITION and info.reason == "WEIGHTS_HASH_MISMATCH"
    assert info.metadata["origin_code"] == "WeightsHashMismatch"
    cache = srv.server.origin.cache
    assert not cache.path("corrupt", "1").exists() and not list((cache.root / ".tmp").iterdir())
    assert cache.stats.discarded >= 1
    assert ask(stub, "legal").text


def test_a_stalled_get_times_out_after_retries_while_others_are_served(remote):
    srv, proxy, _, stub = remote
    ask(stub, "medical")
    outcome = {}

    def stalled():
        outcome["result"] = refused(stub, "stalled")

    t = threading.Thread(target=stalled)
    t.start()
    while proxy.count("GET", "/stalled/1/adapter_model.safetensors") == 0:
        time.sleep(0.05)
    assert ask(stub, "medical").adapter.load_source == pb.LOAD_SOURCE_VRAM  # served while the fetch hangs
    t.join(60)
    code, info = outcome["result"]
    assert code is grpc.StatusCode.UNAVAILABLE and info.reason == "ADAPTER_LOAD_FAILED"
    assert "Timeout" in info.metadata["origin_code"]
    assert proxy.count("GET", "/stalled/1/adapter_model.safetensors") == 2  # one retry
    text = metrics(srv)
    assert sample(text, "loraserve_origin_retries_total") >= 1
    assert sample(text, 'loraserve_origin_fetches_total{result="failed"}') >= 1
    assert not srv.server.origin.cache.path("stalled", "1").exists()


def test_denied_credentials_fail_the_fetch_without_retries(remote, moto_endpoint):
    srv, proxy, _, stub = remote
    ask(stub, "support")
    with credentials_checked(moto_endpoint):
        code, info = refused(stub, "denied")
        assert ask(stub, "support").text  # already resident: served
    assert code is grpc.StatusCode.UNAVAILABLE and info.reason == "ADAPTER_LOAD_FAILED"
    assert info.metadata["origin_code"] in ("InvalidAccessKeyId", "403", "AccessDenied")
    assert proxy.count("HEAD", "/denied/1/adapter_config.json") == 1  # refused at once, not retried
    assert ask(stub, "denied").adapter.load_source == pb.LOAD_SOURCE_REMOTE  # credentials good again


def test_the_endpoint_going_away_leaves_cached_adapters_serving(demo_dir, bucket_store, moto_endpoint, tmp_path):
    proxy = Proxy(moto_endpoint)
    srv = ServerThread(server_config(demo_dir, adapters_dir=STORE, s3_endpoint_url=proxy.endpoint,
                                     disk_cache_dir=tmp_path / "cache", index_poll_s=0.2, origin_timeout_s=1,
                                     origin_retries=1, failed_load_backoff_s=0.0))
    try:
        with srv.channel() as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            warm = ask(stub, "legal")
            proxy.stop()
            deadline = time.monotonic() + 30
            while sample(metrics(srv), "loraserve_index_poll_failures_total") < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ask(stub, "legal").text == warm.text
            code, info = refused(stub, "medical")
            assert code is grpc.StatusCode.UNAVAILABLE and info.reason == "ADAPTER_LOAD_FAILED"
            assert "origin_error" in info.metadata
            assert ask(stub, "legal", max_new_tokens=4).adapter.version == "1"
            assert sample(metrics(srv), "loraserve_index_poll_failures_total") >= 1  # and the last index serves
    finally:
        srv.stop()
