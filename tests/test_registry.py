"""Registry rules as callers see them: aliases, versions, compatibility, fallback, access, hot reload."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import PROMPT, ServerThread, clone_adapter, server_config
from loraserve.v1 import admin_pb2 as apb
from loraserve.v1 import admin_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.registry.store import Store
from test_generate import details

TOKENS = {"acme-token": {"client": "acme"}, "other-token": {"client": "other"},
          "ops-token": {"client": "ops", "admin": True}}


@pytest.fixture(scope="module")
def registry_server(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    for name in ("legal", "medical", "support"):
        clone_adapter(demo_dir, root, name, name, aliases={"legal": ["law"]}.get(name, []))
    wrong = "0" * 64
    clone_adapter(demo_dir, root, "legal", "wrongbase", base_model_revision=wrong)
    clone_adapter(demo_dir, root, "legal", "wrongbase-fb", base_model_revision=wrong, fallback="base")
    for name, fallback in (("tampered", "fail"), ("tampered-fb", "base")):
        weights = clone_adapter(demo_dir, root, "legal", name, fallback=fallback) / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes() + b" ")  # edited after registration
    pickled = clone_adapter(demo_dir, root, "legal", "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    clone_adapter(demo_dir, root, "legal", "bigrank", rank=999)
    clone_adapter(demo_dir, root, "legal", "badtarget", target_modules=["nonexistent_proj"])
    clone_adapter(demo_dir, root, "legal", "retired", status="archived")
    clone_adapter(demo_dir, root, "legal", "unpromoted", status="staging")
    clone_adapter(demo_dir, root, "legal", "private", allowed_clients=["acme"])
    clone_adapter(demo_dir, root, "legal", "broken", status="failed")
    clone_adapter(demo_dir, root, "legal", "escape")  # its directory is swapped for a symlink later
    # Two adapters claiming one id: only a hand edit gets a store into this state.
    clone_adapter(demo_dir, root, "legal", "dupe")
    clone_adapter(demo_dir, root, "medical", "dupe-owner", aliases=["dupe"])
    # Two versions whose answers differ (legal's and medical's weights), v2 staged.
    clone_adapter(demo_dir, root, "legal", "hot", promoted_at="2026-01-01T00:00:00+00:00")
    clone_adapter(demo_dir, root, "medical", "hot", version="2", status="staging")
    tokens = root.parent / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    srv = ServerThread(server_config(demo_dir, adapters_dir=root, auth_tokens_file=tokens))
    with srv.channel() as ch:
        yield srv, Store.local(root), inference_pb2_grpc.InferenceServiceStub(ch), ch
    srv.stop()


def call(stub, adapter, token="acme-token", **kw):
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=12, **kw),
                         metadata=metadata, timeout=60)


def fails(stub, adapter, code, reason=None, **kw):
    with pytest.raises(grpc.RpcError) as caught:
        call(stub, adapter, **kw)
    assert caught.value.code() == code, caught.value.details()
    if reason:
        assert details(caught.value)[0].reason == reason
    return caught.value


def test_alias_and_version_pin_resolve_to_exact_versions(registry_server):
    _, _, stub, _ = registry_server
    by_name = call(stub, "legal")
    by_alias = call(stub, "law")
    pinned = call(stub, "legal@1")
    assert {(r.adapter.id, r.adapter.version) for r in (by_name, by_alias, pinned)} == {("legal", "1")}
    assert by_alias.text == by_name.text == pinned.text
    fails(stub, "legal@7", grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    staged = call(stub, "hot@2")  # a staging version is reachable only by its explicit version
    assert (staged.adapter.id, staged.adapter.version) == ("hot", "2")
    assert call(stub, "hot").adapter.version == "1"


@pytest.mark.parametrize("adapter, reason", [
    ("wrongbase", "ADAPTER_INCOMPATIBLE"),
    ("pickled", "ADAPTER_INCOMPATIBLE"),
    ("bigrank", "ADAPTER_INCOMPATIBLE"),
    ("badtarget", "ADAPTER_INCOMPATIBLE"),
    ("retired", "ADAPTER_NOT_ACTIVE"),
    ("unpromoted", "ADAPTER_NOT_ACTIVE"),
    ("tampered", "WEIGHTS_HASH_MISMATCH"),
])
def test_unusable_adapters_fail_with_failed_precondition(registry_server, adapter, reason):
    _, _, stub, _ = registry_server
    err = fails(stub, adapter, grpc.StatusCode.FAILED_PRECONDITION, reason)
    # An error about a version names it name@VERSION, whether the registry's gate or the weights'
    # read refused it; one about the id asked for (no active version) names that id.
    named = adapter if reason == "ADAPTER_NOT_ACTIVE" else f"{adapter}@1"
    assert f"adapter '{named}' " in err.details() and details(err)[0].metadata["adapter_id"] == named
    assert call(stub, "legal").adapter.id == "legal"  # and nothing else is disturbed


@pytest.mark.parametrize("adapter, reason", [
    ("bigrank", "ADAPTER_INCOMPATIBLE"),
    ("badtarget", "ADAPTER_INCOMPATIBLE"),
    ("broken", "ADAPTER_NOT_ACTIVE"),
    ("retired", "ADAPTER_NOT_ACTIVE"),
    ("dupe", "ADAPTER_AMBIGUOUS"),
])
def test_admin_warm_and_pin_pass_the_same_gate_as_requests(registry_server, adapter, reason):
    _, _, stub, channel = registry_server
    admin = admin_pb2_grpc.AdapterAdminServiceStub(channel)
    ops = (("authorization", "Bearer ops-token"),)
    for rpc, request in (("WarmAdapter", apb.WarmAdapterRequest(adapter_id=adapter)),
                         ("PinAdapter", apb.PinAdapterRequest(adapter_id=adapter))):
        with pytest.raises(grpc.RpcError) as caught:
            getattr(admin, rpc)(request, metadata=ops, timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
        assert details(caught.value)[0].reason == reason
    fails(stub, adapter, grpc.StatusCode.FAILED_PRECONDITION, reason)
    listed = admin.ListAdapters(apb.ListAdaptersRequest(), metadata=ops, timeout=10).adapters
    assert all(a.tier == apb.TIER_DISK for a in listed if a.id == adapter)


def test_a_version_swapped_for_a_symlink_out_of_the_store_is_refused(registry_server, tmp_path):
    _, store, stub, _ = registry_server
    vdir = store.version_dir("escape", "1")
    outside = tmp_path / "outside"
    shutil.move(vdir, outside)
    vdir.symlink_to(outside, target_is_directory=True)
    err = fails(stub, "escape", grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE")
    assert "outside the adapter store" in err.details()


def test_fallback_to_base_only_where_the_adapter_allows_and_always_flagged(registry_server):
    _, _, stub, _ = registry_server
    base = call(stub, "base")
    for adapter, reason in (("wrongbase-fb", "ADAPTER_INCOMPATIBLE"), ("tampered-fb", "WEIGHTS_HASH_MISMATCH")):
        resp = call(stub, adapter)
        assert (resp.adapter.id, resp.adapter.fallback_from, resp.adapter.fallback_reason) == \
            ("base", f"{adapter}@1", reason)
        assert resp.text == base.text
        fails(stub, adapter, grpc.StatusCode.FAILED_PRECONDITION, reason, fallback=pb.FALLBACK_FAIL)
    # The adapter's policy is "fail": a request cannot override it.
    fails(stub, "wrongbase", grpc.StatusCode.FAILED_PRECONDITION, fallback=pb.FALLBACK_BASE)
    ok = call(stub, "legal", fallback=pb.FALLBACK_BASE)
    assert ok.adapter.id == "legal" and not ok.adapter.fallback_from


def test_bearer_tokens_and_allowed_clients(registry_server):
    srv, _, stub, channel = registry_server
    fails(stub, "legal", grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", token=None)
    fails(stub, "legal", grpc.StatusCode.UNAUTHENTICATED, token="forged")
    assert call(stub, "private", token="acme-token").adapter.id == "private"
    fails(stub, "private", grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", token="other-token")
    admin = admin_pb2_grpc.AdapterAdminServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        admin.ListAdapters(apb.ListAdaptersRequest(), metadata=(("authorization", "Bearer acme-token"),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = admin.ListAdapters(apb.ListAdaptersRequest(), metadata=(("authorization", "Bearer ops-token"),),
                                timeout=10)
    assert {"legal", "hot", "private"} <= {a.id for a in listed.adapters}
    # Health and reflection need no token.
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_each_request_logs_one_structured_line(registry_server, caplog):
    _, _, stub, _ = registry_server
    with caplog.at_level(logging.INFO, logger="loraserve.requests"):
        call(stub, "law", request_id="log-me")
        fails(stub, "private", grpc.StatusCode.PERMISSION_DENIED, token="other-token", request_id="denied")
    lines = {json.loads(r.message)["request_id"]: json.loads(r.message) for r in caplog.records}
    ok = lines["log-me"]
    assert (ok["client"], ok["adapter"], ok["version"], ok["status"]) == ("acme", "legal", "1", "OK")
    assert {"base_model", "load_source", "load_ms", "queue_ms", "generation_ms"} <= ok.keys()
    # Its cost: the client it is counted for, tokens, and its shares of engine steps and of the load.
    assert ok["client_key"] == "acme" and ok["input_tokens"] > 0 and ok["output_tokens"] > 0
    assert ok["prefill_device_ms"] > 0 and ok["decode_device_ms"] > 0 and ok["adapter_load_ms"] >= 0
    assert (lines["denied"]["client"], lines["denied"]["status"]) == ("other", "PERMISSION_DENIED")


def test_promote_and_rollback_under_traffic_never_fail_or_mix(registry_server):
    srv, store, stub, _ = registry_server
    expected = {"1": call(stub, "legal@1").text, "2": call(stub, "hot@2").text}
    assert expected["1"] != expected["2"]
    seen, errors, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                resp = call(stub, "hot")
                seen.append((resp.adapter.version, resp.text))
            except grpc.RpcError as exc:
                errors.append(exc)

    workers = [threading.Thread(target=traffic) for _ in range(6)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        store.promote("hot", "2")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(v == "2" for v, _ in seen[-5:]):
            time.sleep(0.05)
        store.rollback("hot")
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not errors
    versions = [v for v, _ in seen]
    assert "2" in versions and versions[-1] == "1"  # the new version served, then the rollback took
    assert all(text == expected[version] for version, text in seen)  # never an answer from the other version
