"""Access, aliases and fallback belong to the adapter: a new version inherits them, only
`set-policy` (or a registration that says --change-policy) changes them, every change is in the
passports' policy history, and a store written before this reads safely. The same rules hold in an
S3 bucket; and a serving test: a new version is never served to a client the adapter excludes, and
aliases keep resolving across promote and rollback under traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest

from conftest import PROMPT, REPO, ServerThread, clone_adapter, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.registry.identity import BaseIdentity, base_identity
from loraserve.registry.passport import Passport, SmokeTest
from loraserve.registry.policy import Policy
from loraserve.registry.errors import IndexInvalid, StoreError
from loraserve.registry.store import Store
from test_generate import details
from tiny import fake_base, tiny_adapter

BASE = BaseIdentity("tiny-base", "rev-1")


def passed(_dir):
    return SmokeTest(True, "now", [{"prompt": "p", "output": "o"}])


@pytest.fixture()
def raw(tmp_path):
    return tiny_adapter(tmp_path / "raw")


def policies(store, name) -> set[Policy]:
    """The policy each version's passport holds, as the index says (a set: one when they agree)."""
    return {Policy.of(p) for p in store.snapshot().versions(name)}


def test_a_new_version_inherits_its_adapters_policy(any_store, raw):
    store = any_store
    store.register(raw, "secret", BASE, passed, allowed_clients=["acme"], aliases=["vault"], fallback="base")
    second = store.register(raw, "secret", BASE, passed)
    assert (second.allowed_clients, second.aliases, second.fallback) == (["acme"], ["vault"], "base")
    assert policies(store, "secret") == {Policy(("acme",), ("vault",), "base")}
    assert [e["change"] for e in second.policy_history] == ["register"]
    # Passing the same policy again is no change.
    assert store.register(raw, "secret", BASE, passed, aliases=["vault"]).version == "3"


def test_a_different_policy_at_registration_is_refused_unless_it_says_so(any_store, raw):
    store = any_store
    store.register(raw, "secret", BASE, passed, allowed_clients=["acme"], aliases=["vault"])
    for change in ({"allowed_clients": []}, {"aliases": ["safe"]}, {"fallback": "base"}):
        with pytest.raises(StoreError, match="--change-policy"):
            store.register(raw, "secret", BASE, passed, **change)
    assert [p.version for p in store.snapshot().versions("secret")] == ["1"]
    third = store.register(raw, "secret", BASE, passed, change_policy=True, allowed_clients=["acme", "beta"])
    assert policies(store, "secret") == {Policy(("acme", "beta"), ("vault",), "fail")}
    assert [(e["change"], e.get("version")) for e in third.policy_history] == \
        [("register", "1"), ("register --change-policy", third.version)]


def test_set_policy_changes_every_version_and_is_recorded(any_store, raw):
    store = any_store
    store.register(raw, "legal", BASE, passed, aliases=["law"])
    store.register(raw, "legal", BASE, passed)
    store.promote("legal", "1")
    changed = store.set_policy("legal", reason="ticket 12", allowed_clients=["acme"], aliases=["law", "lex"])
    assert [p.version for p in changed] == ["1", "2"]
    assert policies(store, "legal") == {Policy(("acme",), ("law", "lex"), "fail")}
    last = store.snapshot().get("legal", "2").policy_history[-1]
    assert (last["change"], last["reason"], last["aliases"]) == ("set-policy", "ticket 12", ["law", "lex"])
    assert store.set_policy("legal", aliases=["law", "lex"]) and \
        len(store.snapshot().get("legal", "1").policy_history) == 2  # no change, no entry
    store.register(raw, "medical", BASE, passed)
    for requested, why in (({"aliases": ["base"]}, "'base' is reserved"),
                           ({"aliases": ["medical"]}, "already the name of medical"),
                           ({"fallback": "maybe"}, "fallback must be one of")):
        with pytest.raises(StoreError, match=why):
            store.set_policy("legal", **requested)
    with pytest.raises(StoreError, match="not in the store"):
        store.set_policy("ghost", aliases=[])
    assert store.snapshot().owner("lex") == "legal"


def test_an_alias_belongs_to_the_adapter_whichever_version_is_active(raw, tmp_path):
    store = Store.local(tmp_path / "store")
    store.register(raw, "legal", BASE, passed, aliases=["law"])
    assert store.snapshot().owner("law") == "legal"  # before any promotion: the id is the adapter's
    for _ in range(2):
        store.register(raw, "legal", BASE, passed)
    for step in (lambda: store.promote("legal", "1"), lambda: store.promote("legal", "3"),
                 lambda: store.rollback("legal"), lambda: store.archive("legal")):
        step()
        assert store.snapshot().owner("law") == "legal"


def test_a_store_whose_versions_disagree_reads_safely_and_recovery_unifies_it(raw, tmp_path):
    """As a store registered before policies were the adapter's: v1 restricted with an alias,
    v2 open without one (the issue's `secret`)."""
    store = Store.local(tmp_path / "store")
    store.register(raw, "secret", BASE, passed, allowed_clients=["acme", "beta"], aliases=["vault"])
    store.register(raw, "secret", BASE, passed, change_policy=True, allowed_clients=["acme", "gamma"],
                   aliases=["safe"], fallback="base")
    index = json.loads((store.root / "registry.json").read_text())
    for entry, (allowed, aliases, fallback) in zip(index["adapters"], ((["acme", "beta"], ["vault"], "base"),
                                                                       ([], ["safe"], "fail"))):
        entry.update(allowed_clients=allowed, aliases=aliases, fallback=fallback, policy_history=[])
    (store.root / "registry.json").write_text(json.dumps(index))
    # Never wider than any version granted: access narrowed, aliases kept, no fallback unless all allow it.
    expected = Policy(("acme", "beta"), ("vault", "safe"), "fail")
    assert store.snapshot().policy("secret") == expected
    assert Store.open(store.root).snapshot().policy("secret") == expected  # recovery writes it down
    assert policies(store, "secret") == {expected}
    assert all(Passport.read(store.version_dir("secret", v)).policy_history[-1]["change"] == "unified"
               for v in ("1", "2"))
    # Lists with no client in common cannot be narrowed into one: that index does not validate.
    index = json.loads((store.root / "registry.json").read_text())
    index["adapters"][1]["allowed_clients"] = ["gamma"]
    (store.root / "registry.json").write_text(json.dumps(index))
    with pytest.raises(IndexInvalid, match="no client is allowed by all"):
        store.snapshot()


def test_a_policy_change_interrupted_before_its_passports_is_finished_by_recovery(raw, tmp_path):
    """set-policy writes the index first; the index decides, as it does for status."""
    store = Store.local(tmp_path / "store")
    for _ in range(2):
        store.register(raw, "legal", BASE, passed, aliases=["law"])
    stale = Passport.read(store.version_dir("legal", "2"))
    store.set_policy("legal", aliases=["lex"])
    stale.write(store.version_dir("legal", "2"))  # as if killed before mirroring version 2's passport
    Store.open(store.root)
    assert Passport.read(store.version_dir("legal", "2")).aliases == ["lex"]


def test_cli_register_inherits_refuses_a_silent_change_and_set_policy_changes(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    raw, base = tiny_adapter(tmp_path / "raw"), fake_base(tmp_path / "base")
    root = tmp_path / "store"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "loraserve.registry.cli", "--store", str(root), "--json", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    register = ("register", str(raw), "--name", "secret", "--no-smoke", "--model-path", str(base))
    assert cli(*register, "--allowed-clients", "acme", "--aliases", "vault").returncode == 0
    inherited = cli(*register)
    assert inherited.returncode == 0, inherited.stderr
    assert json.loads(inherited.stdout)[0]["allowed_clients"] == ["acme"]
    refused = cli(*register, "--allowed-clients", "other")
    assert refused.returncode == 1 and "--change-policy" in refused.stderr
    assert cli(*register, "--fallback", "base", "--change-policy").returncode == 0
    assert cli("set-policy", "secret").returncode == 1  # nothing to change
    done = cli("set-policy", "secret", "--all-clients", "--no-aliases", "--reason", "opened up")
    assert done.returncode == 0, done.stderr
    assert {(tuple(p["allowed_clients"]), tuple(p["aliases"]), p["fallback"], p["policy_history"][-1]["reason"])
            for p in json.loads(done.stdout)} == {((), (), "base", "opened up")}
    assert "'base' is reserved" in cli("set-policy", "secret", "--aliases", "base").stderr


# -- serving ---------------------------------------------------------------------------------
TOKENS = {"acme-token": {"client": "acme"}, "other-token": {"client": "other"}}


@pytest.fixture(scope="module")
def guarded(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    clone_adapter(demo_dir, root, "legal", "secret", allowed_clients=["acme"], aliases=["vault"])
    clone_adapter(demo_dir, root, "legal", "legal", aliases=["law"])
    tokens = root.parent / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    srv = ServerThread(server_config(demo_dir, adapters_dir=root, auth_tokens_file=tokens))
    with srv.channel() as ch:
        yield srv, Store.local(root), inference_pb2_grpc.InferenceServiceStub(ch)
    srv.stop()


def ask(stub, adapter, token):
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=2),
                         metadata=(("authorization", f"Bearer {token}"),), timeout=60)


def test_new_versions_are_never_served_to_excluded_clients_and_aliases_keep_resolving(guarded, demo_dir):
    """While versions are registered (without policy flags), promoted and rolled back: `other`
    never gets `secret` by any id, `acme` always does, and `law`/`vault` never stop resolving."""
    _, store, stub = guarded
    base = base_identity(demo_dir / "base")
    outcomes: list[tuple[str, str, str]] = []
    stop = threading.Event()

    def traffic(adapter, token):
        while not stop.is_set():
            try:
                r = ask(stub, adapter, token)
                outcomes.append((adapter, token, f"OK {r.adapter.id}@{r.adapter.version}"))
            except grpc.RpcError as exc:
                outcomes.append((adapter, token, details(exc)[0].reason))

    ids = ("secret", "vault", "secret@1", "secret@2", "secret@3", "law")
    workers = [threading.Thread(target=traffic, args=(a, t)) for a in ids for t in ("acme-token", "other-token")]
    for w in workers:
        w.start()
    try:
        for name in ("secret", "legal"):
            for _ in range(2):  # a new version passes no policy flag: it inherits
                store.register(demo_dir / "adapters" / "legal" / "1", name, base, passed)
        for step in (lambda: store.promote("secret", "2"), lambda: store.promote("legal", "2"),
                     lambda: store.promote("secret", "3"), lambda: store.rollback("secret"),
                     lambda: store.rollback("legal")):
            time.sleep(0.6)
            step()
        time.sleep(0.6)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    served_to_other = [o for o in outcomes if o[1] == "other-token" and o[0] != "law" and o[2].startswith("OK")]
    assert not served_to_other, served_to_other[:3]
    assert {o[2] for o in outcomes if o[1] == "other-token" and o[0] != "law"} <= {"PERMISSION_DENIED",
                                                                                 "ADAPTER_NOT_FOUND"}
    by_alias = [o[2] for o in outcomes if o[0] in ("law", "vault") and (o[0], o[1]) != ("vault", "other-token")]
    assert len(by_alias) >= 15 and all(o.startswith("OK") for o in by_alias), (len(by_alias), set(by_alias))
    assert {o[2] for o in outcomes if o[0] == "secret@2" and o[1] == "acme-token"} >= {"OK secret@2"}
    assert ask(stub, "vault", "acme-token").adapter.version == "2"  # rolled back from 3 to 2
