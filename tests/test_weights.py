"""Facts from the tensors, not the config: what registration records and refuses (no model needed)."""

from __future__ import annotations

import json

import pytest

from loraserve.registry.identity import BaseIdentity
from loraserve.registry.passport import SmokeTest
from loraserve.registry.errors import StoreError
from loraserve.registry.store import Store
from loraserve.registry.weights import WeightsError, check_against_config, weight_facts
from tiny import tiny_adapter

BASE = BaseIdentity("tiny-base", "rev-1")


def smoke(calls):
    def run(_dir):
        calls.append(_dir)
        return SmokeTest(True, "now", [{"prompt": "p", "output": "o"}])
    return run


def test_facts_come_from_the_tensor_shapes(tmp_path):
    path = tiny_adapter(tmp_path / "a", rank=8, modules=("q_proj", "v_proj"), layers=2) / "adapter_model.safetensors"
    facts = weight_facts(path)
    assert facts.rank == 8 and facts.dtype == "F32" and len(facts.ranks) == 4
    assert facts.target_modules == ["q_proj", "v_proj"] and facts.leaf_ranks() == {"q_proj": 8, "v_proj": 8}


@pytest.mark.parametrize("config, complaint", [
    ({"r": 8}, "rank 512 in the tensors but 8"),
    ({"r": 0}, "config r is 0"),
    ({"r": 512, "target_modules": ["q_proj"]}, "does not name"),
    ({"r": 512, "target_modules": ["q_proj", "v_proj", "k_proj"]}, "['k_proj'] have no tensors"),
    ({"r": 512, "target_modules": "(unclosed"}, "invalid pattern"),
])
def test_a_config_that_lies_about_its_tensors_is_refused(tmp_path, config, complaint):
    facts = weight_facts(tiny_adapter(tmp_path / "a", rank=512) / "adapter_model.safetensors")
    with pytest.raises(WeightsError, match=complaint.replace("[", r"\[").replace("(", r"\(")):
        check_against_config(facts, {"target_modules": ["q_proj", "v_proj"], **config})


def checked_facts(adapter_dir):
    """What the runner does when it reads an adapter for serving."""
    blob = (adapter_dir / "adapter_model.safetensors").read_bytes()
    facts = weight_facts(blob)
    check_against_config(facts, json.loads((adapter_dir / "adapter_config.json").read_text()))
    return facts


def test_rank_pattern_may_give_modules_their_own_rank(tmp_path):
    d = tiny_adapter(tmp_path / "a", rank=4, ranks={"q_proj": (16, 16)}, rank_pattern={"q_proj": 16})
    facts = checked_facts(d)
    assert facts.rank == 16 and facts.leaf_ranks() == {"q_proj": 16, "v_proj": 4}
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(WeightsError, match="rank 16 in the tensors but 4"):
        checked_facts(d)


@pytest.mark.parametrize("make, complaint", [
    (lambda d: tiny_adapter(d, ranks={"q_proj": (8, 4)}), "lora_A has rank 8 but lora_B has rank 4"),
    (lambda d: tiny_adapter(d, rank=0), "rank 0"),
    (lambda d: (tiny_adapter(d) / "adapter_model.safetensors").write_bytes(b"\xff" * 64), "header"),
])
def test_malformed_weights_are_refused(tmp_path, make, complaint):
    make(tmp_path / "a")
    with pytest.raises(WeightsError, match=complaint):
        checked_facts(tmp_path / "a")


def test_registration_records_tensor_facts_and_fails_a_lying_adapter(tmp_path):
    store, calls = Store.local(tmp_path / "store"), []
    good = store.register(tiny_adapter(tmp_path / "good", rank=8), "good", BASE, smoke(calls))
    assert (good.status, good.rank, good.ranks, good.dtype) == ("staging", 8, {"q_proj": 8, "v_proj": 8}, "F32")
    liar = tiny_adapter(tmp_path / "liar", rank=512)
    config = json.loads((liar / "adapter_config.json").read_text())
    (liar / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    bad = store.register(liar, "liar", BASE, smoke(calls))
    assert bad.status == "failed" and bad.rank == 512 and "rank 512 in the tensors but 8" in bad.failure
    assert len(calls) == 1  # the liar was never smoke-tested (loaded)
    assert store.snapshot().get("liar", "1").failure == bad.failure  # the reason is in the passport
    with pytest.raises(StoreError, match="cannot be promoted: weights disagree"):
        store.promote("liar", "1")
