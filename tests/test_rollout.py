"""Canary rollouts (registry.rollout, server.rollouts): the lifecycle in local and S3 stores, the
split's share and stickiness, the judge, a served canary whose every answer is its version's,
the automatic rollback of a version with non-finite weights, and SIGKILL during canary changes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPT, REPO, ServerThread, clone_adapter, server_config
from loraserve.v1 import admin_pb2, admin_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.registry.rollout import Canary, Limits, routed
from loraserve.registry.errors import IndexInvalid, StoreError
from loraserve.registry.snapshot import INDEX, now_iso, parse_index
from loraserve.registry.store import Store
from loraserve.server.rollouts import Sample, judge
from test_crash import passed, timed, wait_for_lock
from test_generate import details
from test_policy import BASE
from test_store_safety import consistent
from tiny import fake_base, tiny_adapter


def canary(percent=10.0, **kw) -> Canary:
    return Canary(percent=percent, started_at=now_iso(), **kw)


@pytest.fixture()
def three(any_store, tmp_path):
    """legal 1 active, 2 and 3 staging."""
    raw = tiny_adapter(tmp_path / "raw")
    for _ in range(3):
        any_store.register(raw, "legal", BASE, passed, aliases=None if _ else ["law"])
    any_store.promote("legal", "1")
    return any_store


def test_canary_lifecycle_promote_completes_rollback_ends(three):
    store = three
    started = store.canary("legal", "2", canary(10)).canary.started_at
    snap = store.snapshot()
    assert snap.canary("legal").version == "2" and snap.active("legal").version == "1"
    with pytest.raises(StoreError, match="legal@2 already has a running canary"):
        store.canary("legal", "3", canary(10))
    store.canary("legal", "2", canary(40, key="client"))  # a ramp: the same canary, a new share
    c = store.snapshot().canary("legal").canary
    assert (c.percent, c.key, c.started_at) == (40, "client", started)
    store.promote("legal", "2")
    snap = store.snapshot()
    assert snap.active("legal").version == "2" and snap.canary("legal") is None
    assert snap.get("legal", "2").canary.state == "completed"
    store.canary("legal", "3", canary(20))
    assert store.rollback("legal").version == "2"  # ends the canary; the active version stays
    snap = store.snapshot()
    assert snap.active("legal").version == "2" and snap.get("legal", "3").canary.state == "ended"
    assert store.rollback("legal").version == "1"  # no canary: the ordinary rollback


def test_canary_refusals(three):
    store = three
    with pytest.raises(StoreError, match="already the active version"):
        store.canary("legal", "1", canary())
    with pytest.raises(StoreError, match="not in the store"):
        store.canary("legal", "9", canary())
    store.archive("legal")
    with pytest.raises(StoreError, match="no active version"):
        store.canary("legal", "2", canary())
    for bad in (dict(percent=0), dict(percent=100), dict(percent=10, key="ip"),
                dict(percent=10, limits={"min_requests": 0}), dict(percent=10, limits={"x": 1})):
        with pytest.raises(ValueError):
            canary(**bad)


def test_the_server_abort_is_recorded_with_its_figures(three):
    store = three
    store.canary("legal", "2", canary(50))
    assert store.abort_canary("legal", "3", "not this one", {}) is None
    done = store.abort_canary("legal", "2", "error rate 0.5", {"canary": {"requests": 8}})
    assert done.canary.state == "aborted" and done.canary.figures == {"canary": {"requests": 8}}
    assert store.snapshot().canary("legal") is None
    assert store.abort_canary("legal", "2", "again", {}) is None  # a second replica's write changes nothing


def test_an_index_with_two_running_canaries_is_refused(tmp_path):
    raw = tiny_adapter(tmp_path / "raw")
    store = Store.local(tmp_path / "store")
    for _ in range(3):
        store.register(raw, "legal", BASE, passed)
    store.promote("legal", "1")
    store.canary("legal", "2", canary())
    index = json.loads((store.root / INDEX).read_text())
    index["adapters"][2]["canary"] = index["adapters"][1]["canary"]
    with pytest.raises(IndexInvalid, match="2 running canaries"):
        parse_index(json.dumps(index), "registry.json")


def test_per_request_split_follows_the_draw_and_client_split_is_sticky():
    c = canary(30)
    assert routed(c, "legal@2", "acme", 29.9) and not routed(c, "legal@2", "acme", 30.0)
    sticky = canary(30, key="client")
    clients = [f"client-{i}" for i in range(2000)]
    first = [routed(sticky, "legal@2", who, random.uniform(0, 100)) for who in clients]
    assert first == [routed(sticky, "legal@2", who, random.uniform(0, 100)) for who in clients]
    assert 0.26 < sum(first) / len(first) < 0.34


def test_judge_needs_min_requests_and_compares_with_the_stable_version():
    limits = Limits(max_error_rate=0.1, max_ttft_p95_ratio=2.0, min_requests=10, window_s=60)
    ok = [Sample(0, False, 0.1)] * 20
    assert judge([Sample(0, True, None)] * 9, ok, limits) is None  # too few to judge
    assert "error rate 1.000" in judge([Sample(0, True, None)] * 10, ok, limits)
    bad_stable = [Sample(0, True, None)] * 20
    assert judge([Sample(0, True, None)] * 10, bad_stable, limits) is None  # no worse than stable
    assert "time-to-first-token p95" in judge([Sample(0, False, 0.25)] * 10, ok, limits)
    assert judge([Sample(0, False, 0.15)] * 10, ok, limits) is None


def test_cli_promote_canary_show_and_list(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    raw, base = tiny_adapter(tmp_path / "raw"), fake_base(tmp_path / "base")
    store = Store.local(tmp_path / "store")
    for _ in range(2):
        store.register(raw, "x", BASE, passed)
    store.promote("x", "1")

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "loraserve.registry.cli", "--store", str(store.root), *args], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60)
        return out.returncode, out.stdout, out.stderr

    code, out, err = run("promote", "x", "2", "--canary", "25", "--canary-key", "client", "--min-requests", "5")
    assert code == 0, err
    assert "25% client" in run("list")[1]
    shown = json.loads(run("show", "x@2")[1])
    assert shown["canary"]["state"] == "running" and shown["canary"]["limits"]["min_requests"] == 5
    code, _, err = run("promote", "x", "2", "--canary", "150")
    assert code == 1 and "percent must be between 0 and 100" in err
    assert run("rollback", "x")[0] == 0
    assert json.loads(run("show", "x@2")[1])["canary"]["state"] == "ended"
    assert base  # the CLI needs no model for these


def test_sigkill_during_canary_changes_leaves_one_consistent_store(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    raw = tiny_adapter(tmp_path / "raw")
    store = Store.local(tmp_path / "store")
    for _ in range(3):
        store.register(raw, "x", BASE, passed)
    store.promote("x", "1")
    ops = [("promote", "x", "2", "--canary", "10"), ("rollback", "x"), ("promote", "x", "2", "--canary", "30"),
           ("promote", "x", "2"), ("promote", "x", "3", "--canary", "50"), ("promote", "x", "1")]

    def cli(*args):
        return subprocess.Popen([sys.executable, "-m", "loraserve.registry.cli", "--store", str(store.root), *args], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    span = timed(cli("list"))
    rng = random.Random(27)
    for i in range(36):
        proc = cli(*ops[i % len(ops)])
        if i % 2:
            wait_for_lock(proc.pid, span * 3)
            time.sleep(rng.uniform(0, 0.01))
        else:
            time.sleep(rng.uniform(0, span * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        snap = Store.open(store.root).snapshot()
        index = consistent(store)
        assert len(index) == 3 and not snap.problems()
        assert sum(bool(p.canary and p.canary.running) for p in snap.passports) <= 1


# -- served --------------------------------------------------------------------------------
def _poison(version_dir) -> None:
    """Non-finite weights that the passport's hash vouches for: a version that was registered
    broken (as a bad training run would), not a corrupted file."""
    weights = version_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for key in tensors:
        if "lora_B" in key:
            tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    meta = json.loads((version_dir / "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (version_dir / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def rollout(demo_dir, tmp_path_factory):
    """legal@1 (the demo's legal) active; legal@2 (the demo's medical weights: other answers) and
    legal@3 (non-finite weights) staging."""
    root = tmp_path_factory.mktemp("store")
    clone_adapter(demo_dir, root, "legal", "legal", aliases=["law"])
    clone_adapter(demo_dir, root, "medical", "legal", "2", status="staging", promoted_at="")
    _poison(clone_adapter(demo_dir, root, "legal", "legal", "3", status="staging", promoted_at=""))
    Store.local(root).reindex()
    srv = ServerThread(server_config(demo_dir, adapters_dir=root))
    with srv.channel() as ch:
        yield srv, Store.local(root), inference_pb2_grpc.InferenceServiceStub(ch), admin_pb2_grpc.AdapterAdminServiceStub(ch)
    srv.stop()


def _ask(stub, adapter):
    return stub.Generate.future(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=4), timeout=120)


def test_a_canary_gets_its_share_and_every_answer_is_its_versions(rollout):
    srv, store, stub, admin = rollout
    pinned = {v: stub.Generate(pb.GenerateRequest(adapter_id=f"legal@{v}", prompt=PROMPT, max_new_tokens=4),
                               timeout=120).text for v in ("1", "2")}
    assert pinned["1"] != pinned["2"]
    store.canary("legal", "2", canary(30, limits=Limits(min_requests=1000)))
    try:
        answers = []
        for _ in range(4):  # waves of 100: one client may have 256 calls in flight
            answers += [f.result() for f in [_ask(stub, ("legal", "law")[i % 2]) for i in range(100)]]
        to_canary = sum(a.adapter.version == "2" for a in answers)
        assert 0.20 <= to_canary / 400 <= 0.40, to_canary
        assert all(a.text == pinned[a.adapter.version] for a in answers)
        assert {a.adapter.version for a in stub_pinned(stub)} == {"1"}  # legal@1 pinned is never split
        listed = {(a.id, a.version): a for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest(),
                                                                    timeout=30).adapters}
        assert listed[("legal", "2")].canary.state == "running" and listed[("legal", "2")].canary.percent == 30
        assert listed[("legal", "1")].status == "active"
        text = srv.server.metrics.registry.get_sample_value(
            "loraserve_canary_requests_total", {"adapter": "legal", "version": "2", "side": "canary",
                                                "outcome": "ok"})
        assert text == to_canary
    finally:
        store.rollback("legal")
    assert all(f.result().adapter.version == "1" for f in [_ask(stub, "legal") for _ in range(20)])


def stub_pinned(stub):
    return [f.result() for f in [_ask(stub, "legal@1") for _ in range(20)]]


def test_a_failing_canary_is_rolled_back_automatically(rollout):
    srv, store, stub, _ = rollout
    store.canary("legal", "3", canary(50, limits=Limits(max_error_rate=0.2, min_requests=5, window_s=600)))
    outcomes = []
    for _ in range(8):  # waves: the abort lands between them
        for f in [_ask(stub, "legal") for _ in range(10)]:
            try:
                outcomes.append(f"OK legal@{f.result().adapter.version}")
            except grpc.RpcError as exc:
                outcomes.append(details(exc)[0].reason)
    errors = [o for o in outcomes if not o.startswith("OK")]
    assert errors and set(errors) == {"NON_FINITE_LOGITS"}, set(outcomes)
    assert {o for o in outcomes if o.startswith("OK")} == {"OK legal@1"}
    assert outcomes[-10:] == ["OK legal@1"] * 10  # routing stopped at the breach
    deadline = time.monotonic() + 30
    while (c := store.snapshot().get("legal", "3").canary).state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.state == "aborted" and "error rate" in c.reason
    # Requests already routed to the canary when it tripped still fail: its own, and only those.
    assert len(errors) >= c.figures["canary"]["errors"] >= 5 and c.figures["stable"]["errors"] == 0
    assert c.figures["stable"]["requests"] <= len(outcomes) - len(errors)  # this canary's own, not an earlier one's
    assert srv.server.metrics.registry.get_sample_value("loraserve_canary_aborts_total", {"adapter": "legal"}) == 1
