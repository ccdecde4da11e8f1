"""The demo build is reproducible: the same spec builds the same bytes, whatever threads the caller runs."""

from __future__ import annotations

import hashlib

import pytest
import torch

from loraserve.runner import determinism
from loraserve.runner.demo import DemoSpec, build_demo

pytestmark = pytest.mark.slow


def _digests(out) -> dict[str, str]:
    files = [*out.rglob("*.safetensors"), out / "base" / "tokenizer.json"]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_two_builds_under_different_thread_counts_write_the_same_bytes(tmp_path):
    spec = DemoSpec(adapters=("legal",), base_steps=4, adapter_steps=3)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    builds = []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            build_demo(tmp_path / str(n), spec)
            # The caller's settings are back once the build is done.
            assert torch.get_num_threads() == n and torch.are_deterministic_algorithms_enabled() == deterministic
            builds.append(_digests(tmp_path / str(n)))
    finally:
        torch.set_num_threads(threads)
    assert len(builds[0]) == 3 and builds[0] == builds[1]


def test_a_build_during_a_deterministic_engines_life_leaves_the_switch_held(tmp_path):
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    determinism.hold()  # what a --deterministic engine does at start
    try:
        build_demo(tmp_path / "demo", DemoSpec(adapters=("legal",), base_steps=2, adapter_steps=2))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        determinism.release()
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before
