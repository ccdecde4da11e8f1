"""A damaged registry.json never reaches a request. Rewritten in place as an operator or a broken
tool would, while clients call: the last valid index keeps serving, each refusal is logged,
counted once (loraserve_registry_reload_errors_total) and reported (health "loraserve.registry",
GetCacheStats); a store without a valid index does not start; a rewrite that keeps inode, size and
mtime is still noticed."""

from __future__ import annotations

import json
import os
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
from loraserve.registry.local import file_stamp
from loraserve.registry.store import Store
from test_observability import scrape, total

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _entries(good: bytes) -> list[dict]:
    return json.loads(good)["adapters"]


def _edited(good: bytes, key: str, **changes) -> bytes:
    entries = _entries(good)
    for e in entries:
        if f"{e['name']}@{e['version']}" == key:
            e.update(changes)
    return json.dumps({"adapters": entries}).encode()


def _without(good: bytes, key: str, field: str) -> bytes:
    entries = _entries(good)
    for e in entries:
        if f"{e['name']}@{e['version']}" == key:
            del e[field]
    return json.dumps({"adapters": entries}).encode()


# What the careless operator wrote over registry.json, and what the refusal must name.
DAMAGE = {
    "empty": (lambda good: b"", "not JSON"),
    "truncated": (lambda good: good[: len(good) // 2], "not JSON"),
    "not json": (lambda good: b"adapters: legal", "not JSON"),
    "a list": (lambda good: b"[]", "'adapters' list"),
    "no adapters": (lambda good: b'{"generated": "now"}', "'adapters' list"),
    "entry not an object": (lambda good: b'{"adapters": [7]}', "entry 0: not an object"),
    "no weights_sha256": (lambda good: _without(good, "legal@1", "weights_sha256"), "weights_sha256"),
    "rank as text": (lambda good: _edited(good, "medical@1", rank="8"), "rank must be a whole number"),
    "aliases as text": (lambda good: _edited(good, "legal@1", aliases="law"), "aliases must be a list"),
    "unknown status": (lambda good: _edited(good, "legal@1", status="live"), "status must be one of"),
    "two active versions": (lambda good: _edited(good, "hot@2", status="active"), "hot has 2 active versions"),
    "reserved name": (lambda good: _edited(good, "support@1", name="base"), "'base' is reserved"),
    "reserved alias": (lambda good: _edited(good, "support@1", aliases=["base"]), "'base' is reserved"),
    "listed twice": (lambda good: json.dumps({"adapters": _entries(good) + _entries(good)[:1]}).encode(),
                     "listed twice"),
}


def rewrite_in_place(path, data: bytes) -> None:
    """As `echo > registry.json` or an editor saving over it: the same inode, not a rename."""
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


@pytest.fixture(scope="module")
def store(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    for name in ("legal", "medical", "support"):
        clone_adapter(demo_dir, root, name, name, aliases={"legal": ["law"]}.get(name, []))
    clone_adapter(demo_dir, root, "legal", "hot", promoted_at="2026-01-01T00:00:00+00:00")
    clone_adapter(demo_dir, root, "medical", "hot", version="2", status="staging")
    return Store.local(root)


@pytest.fixture(scope="module")
def served(demo_dir, store):
    srv = ServerThread(server_config(demo_dir, adapters_dir=store.root, index_poll_s=0.1))
    with srv.channel() as ch:
        yield srv, ch
    srv.stop()


def call(stub, adapter):
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=3), timeout=60)


def registry_health(channel):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="loraserve.registry"),
                                                     timeout=5).status


def stats(channel):
    return admin_pb2_grpc.AdapterAdminServiceStub(channel).GetCacheStats(apb.GetCacheStatsRequest(), timeout=10)


def eventually(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_every_kind_of_damage_is_refused_while_the_last_valid_index_serves(served, store):
    srv, channel = served
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    path = store.root / "registry.json"
    good = path.read_bytes()
    expected = {a: (call(stub, a).adapter.id, call(stub, a).text) for a in ("legal", "law", "medical", "hot")}
    answers, errors, stop = [], [], threading.Event()

    def traffic(adapter):
        while not stop.is_set():
            try:
                r = call(stub, adapter)
                answers.append((adapter, r.adapter.id, r.adapter.version, r.text))
            except grpc.RpcError as exc:
                errors.append((adapter, exc.code(), exc.details()))

    workers = [threading.Thread(target=traffic, args=(a,)) for a in expected for _ in range(2)]
    for w in workers:
        w.start()
    before = stats(channel).registry_reload_errors
    try:
        for kind, (damage, why) in DAMAGE.items():
            counted = stats(channel).registry_reload_errors
            rewrite_in_place(path, damage(good))
            assert eventually(lambda: why in stats(channel).registry_index_error), (kind, stats(channel))
            assert eventually(lambda: registry_health(channel) == NOT_SERVING), kind
            # Refused once: look-ups and polls meanwhile neither read it again nor count it again
            # (writing in place, the server may also have seen the file half-written: a refusal too).
            refused = stats(channel).registry_reload_errors
            assert refused > counted, kind
            time.sleep(0.3)
            assert stats(channel).registry_reload_errors == refused, kind
            rewrite_in_place(path, good)
            assert eventually(lambda: stats(channel).registry_index_error == ""), kind
            assert eventually(lambda: registry_health(channel) == SERVING), kind
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert not errors, errors[:3]
    assert len(answers) > len(DAMAGE)
    assert all((adapter_id, text) == expected[asked] and version == "1"
               for asked, adapter_id, version, text in answers)
    metrics, counted = scrape(srv), stats(channel).registry_reload_errors
    assert counted >= before + len(DAMAGE)
    assert total(metrics, "loraserve_registry_reload_errors_total") == counted
    assert total(metrics, "loraserve_requests_total", status="INTERNAL") == 0


def test_a_same_size_rewrite_with_its_old_mtime_is_noticed(served, store):
    """A rollback written in place within one timestamp tick: inode, size and mtime unchanged."""
    _, channel = served
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    path = store.root / "registry.json"
    assert call(stub, "hot").adapter.version == "1"
    original = path.read_bytes()
    index = json.loads(original)
    hot = [e for e in index["adapters"] if e["name"] == "hot"]
    hot[0]["status"], hot[1]["status"] = hot[1]["status"], hot[0]["status"]
    promoted = (json.dumps(index, indent=1) + "\n").encode()
    assert len(promoted) == len(original) and promoted != original  # "active" and "staging" swapped
    try:
        for data, version in ((promoted, "2"), (original, "1")):
            st = os.stat(path)
            rewrite_in_place(path, data)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            after = os.stat(path)
            assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
            assert eventually(lambda: call(stub, "hot").adapter.version == version), version
    finally:
        rewrite_in_place(path, original)


def test_a_young_index_is_told_apart_by_its_bytes_even_with_equal_stat_fields():
    """Where ctime is as coarse as mtime, stat fields alone cannot tell two writes within one tick
    apart; the bytes' hash does, while the index is young enough for that to happen."""
    now = time.time()
    fields = [0o100644, 7, 1, 1, 0, 0, 100, int(now), int(now), int(now)]
    young = os.stat_result(fields)
    old = os.stat_result(fields[:7] + [int(now) - 60] * 3)
    assert file_stamp(young, lambda: b"legal@2 active") != file_stamp(young, lambda: b"legal@1 active")
    assert file_stamp(old, lambda: b"legal@2 active") == file_stamp(old, lambda: b"legal@1 active")


def test_a_store_without_a_valid_index_does_not_start(demo_dir, tmp_path):
    root = tmp_path / "store"
    clone_adapter(demo_dir, root, "legal", "legal")
    index = root / "registry.json"
    index.write_bytes(_edited(index.read_bytes(), "legal@1", rank="8"))
    srv = ServerThread(server_config(demo_dir, adapters_dir=root), load=False)
    try:
        with pytest.raises(Exception, match=r"no valid index to serve: .*legal@1: rank must be a whole number"):
            srv.call(srv.server.load())
    finally:
        srv.stop()
