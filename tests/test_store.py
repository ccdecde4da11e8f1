"""The registry store's lifecycle rules, on copies of the demo adapters (no model needed)."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest

from loraserve.registry.identity import BaseIdentity
from loraserve.registry.passport import Evaluation, Passport, SmokeTest
from loraserve.registry.errors import StoreError
from loraserve.registry.store import Store
from tiny import tiny_adapter

BASE = BaseIdentity("demo", "rev-1")


def passed(_dir):
    return SmokeTest(True, "now", [{"prompt": "p", "output": "o"}])


def failed(_dir):
    return SmokeTest(False, "now", [], "empty answers")


@pytest.fixture()
def raw(demo_dir, tmp_path):
    """A bare PEFT directory (what a training job leaves behind)."""
    src = tmp_path / "raw"
    src.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(demo_dir / "adapters" / "legal" / "1" / f, src / f)
    return src


def test_register_versions_hashes_and_indexes(raw, tmp_path):
    store = Store.local(tmp_path / "store")
    first = store.register(raw, "legal", BASE, passed, task="summarize", client="acme", aliases=["law"])
    second = store.register(raw, "legal", BASE, passed)
    assert (first.version, second.version) == ("1", "2")
    assert first.status == "staging" and first.rank == 8 and "q_proj" in first.target_modules
    assert first.base_model_revision == "rev-1" and len(first.weights_sha256) == 64
    assert Passport.read(store.version_dir("legal", "1")).client == "acme"
    index = json.loads((store.root / "registry.json").read_text())
    assert [a["version"] for a in index["adapters"]] == ["1", "2"]


def test_register_refuses_pickle_and_non_adapters(raw, tmp_path):
    store = Store.local(tmp_path / "store")
    (raw / "adapter_model.safetensors").rename(raw / "adapter_model.bin")
    with pytest.raises(StoreError, match="pickle"):
        store.register(raw, "legal", BASE, passed)
    with pytest.raises(StoreError, match="not a PEFT adapter"):
        store.register(tmp_path, "legal", BASE, passed)
    with pytest.raises(StoreError, match="name"):
        store.register(raw, "../evil", BASE, passed)
    assert not list((tmp_path / "store").glob("*/*")) if (tmp_path / "store").exists() else True


def test_failed_smoke_test_cannot_be_promoted(raw, tmp_path):
    store = Store.local(tmp_path / "store")
    bad = store.register(raw, "legal", BASE, failed)
    assert bad.status == "failed" and bad.smoke_test.error == "empty answers"
    assert bad.failure == "smoke test failed: empty answers"
    with pytest.raises(StoreError, match="smoke test"):
        store.promote("legal", bad.version)


def test_promote_rollback_and_aliases_follow_the_active_version(raw, tmp_path):
    store = Store.local(tmp_path / "store")
    for _ in range(3):
        store.register(raw, "legal", BASE, passed, aliases=["law"])
    store.promote("legal", "1")
    store.promote("legal", "2")
    snap = store.scan()
    assert snap.active("legal").version == "2" and snap.get("legal", "1").status == "archived"
    assert snap.owner("law") == "legal"
    store.promote("legal", "3")
    assert store.rollback("legal").version == "2"
    assert store.scan().get("legal", "3").status == "staging"
    assert store.rollback("legal").version == "1"
    with pytest.raises(StoreError, match="no earlier"):
        store.rollback("legal")


def test_an_alias_cannot_take_another_adapters_name(raw, tmp_path):
    store = Store.local(tmp_path / "store")
    store.register(raw, "medical", BASE, passed)
    with pytest.raises(StoreError, match="alias 'medical' is already the name of medical"):
        store.register(raw, "legal", BASE, passed, aliases=["medical"])


def test_archive_and_stale(raw, tmp_path):
    store = Store.local(tmp_path / "store")
    store.register(raw, "legal", BASE, passed)
    store.register(raw, "legal", BASE, passed)
    store.promote("legal", "2")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=100)
    assert [p.key for p in store.stale(90, today=later)] == ["legal@1"]
    assert store.stale(90) == []
    store.archive("legal")
    assert {p.status for p in store.scan().versions("legal")} == {"archived"}


def test_evaluation_block_lineage_and_stale_by_training_date(tmp_path):
    store, raw = Store.local(tmp_path / "store"), tiny_adapter(tmp_path / "raw")
    store.register(raw, "legal", BASE, passed)
    store.promote("legal", "1")
    trained = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=200)).isoformat()
    ev = Evaluation(metrics={"rougeL": 0.41}, eval_set_size=500, evaluated_at="2026-01-02",
                    dataset_sha256="ab" * 32, training_config={"lr": 1e-4, "epochs": 3}, trained_at=trained)
    second = store.register(raw, "legal", BASE, passed, evaluation=ev)
    assert second.evaluation.previous_version == "legal@1"  # lineage defaults to the active version
    assert Passport.read(store.version_dir("legal", "2")).evaluation.metrics == {"rougeL": 0.41}
    assert [p.key for p in store.stale(90)] == ["legal@2"]  # created today, trained 200 days ago
    with pytest.raises(StoreError, match="previous_version legal@9 is not in the store"):
        store.register(raw, "legal", BASE, passed, evaluation=Evaluation(previous_version="legal@9"))
    with pytest.raises(ValueError, match="eval_set_size"):
        Evaluation.from_dict({"eval_set_size": -1})
    with pytest.raises(ValueError, match="unknown field"):
        Evaluation.from_dict({"accuracy": 0.9})


def test_list_sorts_by_any_field_or_metric(tmp_path, capsys):
    from loraserve.registry.cli import main

    store, raw = Store.local(tmp_path / "store"), tiny_adapter(tmp_path / "raw")
    for name, score in (("b", 0.2), ("a", 0.9), ("c", None)):
        metrics = {} if score is None else {"acc": score}
        store.register(raw, name, BASE, passed, evaluation=Evaluation(metrics=metrics))

    def listed(*args):
        assert main(["--store", str(store.root), "--json", "list", *args]) == 0
        return [p["name"] for p in json.loads(capsys.readouterr().out)]

    assert listed() == ["a", "b", "c"]
    assert listed("--sort", "metric.acc") == ["b", "a", "c"]  # no value sorts last
    assert listed("--sort", "metric.acc", "--reverse") == ["a", "b", "c"]
    assert listed("--sort", "created", "--reverse") == ["c", "a", "b"]
    with pytest.raises(SystemExit):
        main(["--store", str(store.root), "list", "--sort", "colour"])
