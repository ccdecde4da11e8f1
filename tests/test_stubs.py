import filecmp
import importlib.util

from conftest import REPO


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path):
    generated = _load_generator().generate(tmp_path)
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = REPO / "pyclient" / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make stubs`"
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run `make stubs`"
