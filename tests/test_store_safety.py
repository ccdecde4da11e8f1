"""The store cannot be talked into ambiguity, recovers from interrupted writes, and stays inside
its root (tiny adapters, no model)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from loraserve.registry.identity import BaseIdentity
from loraserve.registry.passport import Passport, SmokeTest
from loraserve.registry.errors import AmbiguousId, IndexInvalid, StoreError
from loraserve.registry.store import Store
from tiny import tiny_adapter

BASE = BaseIdentity("tiny-base", "rev-1")


def passed(_dir):
    return SmokeTest(True, "now", [{"prompt": "p", "output": "o"}])


@pytest.fixture()
def raw(tmp_path):
    return tiny_adapter(tmp_path / "raw")


@pytest.fixture()
def store(tmp_path):
    return Store.local(tmp_path / "store")


def consistent(store: Store) -> dict:
    """Assert what any reader may rely on; returns the index entries by key."""
    index = {f"{a['name']}@{a['version']}": a for a in json.loads((store.root / "registry.json").read_text())["adapters"]}
    on_disk = {f"{p.parent.parent.name}@{p.parent.name}": json.loads(p.read_text())
               for p in store.root.glob("*/*/metadata.json")}
    assert index == on_disk
    assert all((d / "metadata.json").is_file() for d in store.root.glob("*/*") if d.name.isdigit())
    assert not list((store.root / ".staging").glob("*")) if (store.root / ".staging").exists() else True
    for name in {a["name"] for a in index.values()}:
        assert sum(a["status"] == "active" for a in index.values() if a["name"] == name) <= 1
    return index


# -- one namespace ---------------------------------------------------------------
def test_an_alias_cannot_shadow_a_name_in_either_order(raw, store):
    store.register(raw, "hijacker", BASE, passed, aliases=["newname"])
    store.promote("hijacker", "1")
    with pytest.raises(StoreError, match="name 'newname' is already an alias of hijacker"):
        store.register(raw, "newname", BASE, passed)
    store.register(raw, "legal", BASE, passed)
    with pytest.raises(StoreError, match="alias 'legal' is already the name of legal"):
        store.register(raw, "other", BASE, passed, aliases=["legal"])
    with pytest.raises(StoreError, match="alias 'newname' is already the alias of hijacker"):
        store.register(raw, "other", BASE, passed, aliases=["newname"])
    snap = store.snapshot()
    assert snap.owner("newname") == "hijacker" and snap.owner("legal") == "legal"
    assert snap.names() == ["hijacker", "legal"]


def test_the_reserved_id_base_is_no_name_and_no_alias(raw, store):
    with pytest.raises(StoreError, match="name 'base' is reserved"):
        store.register(raw, "base", BASE, passed)
    with pytest.raises(StoreError, match="alias 'base' is reserved"):
        store.register(raw, "helper", BASE, passed, aliases=["law", "base"])
    assert store.snapshot().passports == ()


def test_a_staged_alias_already_reserves_its_id(raw, store):
    store.register(raw, "support", BASE, passed, aliases=["helpdesk"])  # not promoted yet
    with pytest.raises(StoreError, match="alias of support"):
        store.register(raw, "helpdesk", BASE, passed)


def test_resolution_refuses_ambiguity_made_by_hand(raw, store):
    store.register(raw, "legal", BASE, passed)
    store.register(raw, "support", BASE, passed)
    for name in ("legal", "support"):
        store.promote(name, "1")
    # An edit behind the store's back (aliases are the index's to decide, like status: a hand edit
    # of a passport's would not be taken; one of registry.json is).
    index = json.loads((store.root / "registry.json").read_text())
    next(a for a in index["adapters"] if a["name"] == "support")["aliases"] = ["legal"]
    (store.root / "registry.json").write_text(json.dumps(index))
    snap = store.snapshot()
    with pytest.raises(AmbiguousId, match="'legal' is claimed by legal, support"):
        snap.owner("legal")
    with pytest.raises(AmbiguousId):
        snap.find("legal@1")
    with pytest.raises(StoreError, match="already the name of legal"):
        store.register(raw, "support", BASE, passed, aliases=["legal"])


# -- crash recovery --------------------------------------------------------------
def test_a_version_directory_left_without_a_passport_does_not_block_the_name(raw, store, caplog):
    store.register(raw, "x", BASE, passed)
    (store.root / "x" / "2").mkdir()
    shutil.copy(raw / "adapter_config.json", store.root / "x" / "2")  # killed mid-copy by an older writer
    with caplog.at_level(logging.WARNING, logger="registry"):
        p = store.register(raw, "x", BASE, passed)
    assert p.version == "2" and "without a passport" in caplog.text
    consistent(store)


def test_staging_leftovers_are_removed_but_not_a_live_registration(raw, store):
    store.register(raw, "x", BASE, passed)
    leftover = store.root / ".staging" / "dead"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    seen = []

    def smoke_while_someone_recovers(stage):
        store.recover()  # another writer's recovery runs while this registration is staged
        seen.append(stage.exists())
        return passed(stage)

    store.register(raw, "x", BASE, smoke_while_someone_recovers)
    assert seen == [True] and leftover.exists()
    store.recover()
    assert not leftover.exists()
    consistent(store)


def test_the_index_decides_and_passports_are_reconciled(raw, store, caplog):
    for _ in range(2):
        store.register(raw, "x", BASE, passed)
    store.promote("x", "1")
    # A crash after the index write of "promote x 2", before the passports were mirrored:
    index = json.loads((store.root / "registry.json").read_text())
    for a in index["adapters"]:
        a["status"] = {"1": "archived", "2": "active"}[a["version"]]
    (store.root / "registry.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="registry"):
        snap = Store.open(store.root).snapshot()
    assert snap.active("x").version == "2" and "the index decides" in caplog.text
    assert Passport.read(store.version_dir("x", "2")).status == "active"
    consistent(store)


def test_recovery_adopts_complete_versions_and_drops_vanished_ones(raw, store, caplog):
    for _ in range(3):
        store.register(raw, "x", BASE, passed)
    index = json.loads((store.root / "registry.json").read_text())
    index["adapters"] = [a for a in index["adapters"] if a["version"] != "3"]  # renamed in, index not yet written
    (store.root / "registry.json").write_text(json.dumps(index))
    shutil.rmtree(store.version_dir("x", "1"))
    with caplog.at_level(logging.WARNING, logger="registry"):
        snap = store.recover()
    assert [p.version for p in snap.versions("x")] == ["2", "3"]
    assert "adopting x@3" in caplog.text and "dropping x@1" in caplog.text
    consistent(store)


def test_two_active_versions_are_refused_until_a_reindex(raw, store):
    for _ in range(2):
        store.register(raw, "x", BASE, passed)
    store.promote("x", "1")
    store.promote("x", "2")
    index = json.loads((store.root / "registry.json").read_text())
    for a in index["adapters"]:
        a["status"] = "active"
    (store.root / "registry.json").write_text(json.dumps(index))
    # Neither a reader nor a writer picks one: the index is invalid until someone says what to do.
    for refused in (store.snapshot, store.recover, lambda: store.promote("x", "1")):
        with pytest.raises(IndexInvalid, match="x has 2 active versions"):
            refused()
    assert store.reindex().active("x").version == "2"  # the passports mirrored the last promotion
    consistent(store)


def test_without_an_index_the_passports_rebuild_it(raw, store):
    store.register(raw, "x", BASE, passed)
    store.promote("x", "1")
    (store.root / "registry.json").unlink()
    assert store.snapshot().active("x").version == "1"  # readable before any writer ran
    assert store.reindex().active("x").version == "1"
    consistent(store)


# -- confinement -----------------------------------------------------------------
def test_versions_that_lead_outside_the_store_are_never_read(raw, store, tmp_path):
    store.register(raw, "x", BASE, passed)
    store.promote("x", "1")
    outside = tmp_path / "outside"
    shutil.copytree(store.version_dir("x", "1"), outside)
    (store.root / "x" / "2").symlink_to(outside, target_is_directory=True)
    inside = store.root / "x" / "3"
    inside.mkdir()
    (inside / "metadata.json").symlink_to(outside / "metadata.json")
    assert [p.version for p in store.scan().versions("x")] == ["1"]
    assert [p.version for p in store.reindex().versions("x")] == ["1"]
    with pytest.raises(StoreError, match="outside the adapter store"):
        store.served_dir("x", "2")
    weights = store.version_dir("x", "1") / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(StoreError, match="outside the adapter store"):
        store.served_dir("x", "1")
    assert store.register(raw, "x", BASE, passed).version == "4"  # numbers in use are not reused
