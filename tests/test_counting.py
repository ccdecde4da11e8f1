"""Every inference outcome is counted once in loraserve_requests_total, with its real reason and
the adapter once it was resolved: a scripted mix of outcomes against a real server."""

from __future__ import annotations

import json
import time
from collections import Counter

import grpc
import pytest

from conftest import PROMPT, ServerThread, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.server.app import engine_config
from test_lifecycle import PacedEngine, wait_for
from test_observability import scrape

TOKENS = {"a-token": {"client": "a"}, "b-token": {"client": "b"}}
A, B = (("authorization", "Bearer a-token"),), (("authorization", "Bearer b-token"),)


@pytest.fixture(scope="module")
def one_row(demo_dir, tmp_path_factory):
    """One batch row, decode steps of >= 10 ms, one open call per client."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    cfg = server_config(demo_dir, max_batch_size=1, max_streams_per_client=1, auth_tokens_file=tokens)
    srv = ServerThread(cfg, engine=PacedEngine(engine_config(cfg)))
    yield srv
    srv.stop()


def requests_total(srv) -> Counter:
    prefix = "loraserve_requests_total{"
    found = Counter()
    for name, value in scrape(srv).items():
        if name.startswith(prefix):
            labels = dict(part.split("=", 1) for part in name[len(prefix):-1].split(","))
            found[labels["adapter"].strip('"'), labels["status"].strip('"')] = value
    return found


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_each_outcome_is_counted_once_with_its_reason_and_adapter(one_row):
    before = requests_total(one_row)
    ask = lambda adapter, prompt=PROMPT, **kw: pb.GenerateRequest(adapter_id=adapter, prompt=prompt, **kw)  # noqa: E731
    long = ask("legal", max_new_tokens=400, ignore_eos=True)
    codes = []
    with one_row.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        # The first request also teaches the scheduler its service time (for the expected-wait refusal).
        codes.append(code_of(lambda: stub.Generate(ask("legal", max_new_tokens=20, ignore_eos=True), metadata=A,
                                                   timeout=60)))
        codes.append(code_of(lambda: stub.Generate(ask("ghost"), metadata=A, timeout=30)))
        codes.append(code_of(lambda: stub.Generate(ask("legal", prompt=""), metadata=A, timeout=30)))
        codes.append(code_of(lambda: stub.Generate(ask("medical", prompt="ok " * 600), metadata=A, timeout=30)))
        codes.append(code_of(lambda: channel.unary_unary("/loraserve.v1.InferenceService/Generate")(
            b"\x12\x50", metadata=A, timeout=30)))
        codes.append(code_of(lambda: stub.Generate(ask("legal"), timeout=30)))
        codes.append(code_of(lambda: stub.Generate(ask("legal"), metadata=(("authorization", "Bearer nope"),),
                                                   timeout=30)))
        held = stub.GenerateStream(long, metadata=A, timeout=60)  # holds a's one call and the one row
        next(held)
        codes.append(code_of(lambda: stub.Generate(ask("legal"), metadata=A, timeout=30)))
        codes.append(code_of(lambda: stub.Generate(ask("medical"), metadata=B, timeout=0.1)))
        held.cancel()
        assert wait_for(lambda: one_row.server.scheduler.running == 0)
        # Deadlines that pass mid-generation, unary and streaming.
        codes.append(code_of(lambda: stub.Generate(long, metadata=B, timeout=0.5)))
        assert wait_for(lambda: one_row.server.scheduler.running == 0)
        codes.append(code_of(lambda: list(stub.GenerateStream(long, metadata=B, timeout=0.5))))
    C = grpc.StatusCode
    assert codes == [C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT, C.INVALID_ARGUMENT, C.INVALID_ARGUMENT,
                     C.UNAUTHENTICATED, C.UNAUTHENTICATED, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED,
                     C.DEADLINE_EXCEEDED, C.DEADLINE_EXCEEDED]
    expected = Counter({("legal", "OK"): 1, ("-", "ADAPTER_NOT_FOUND"): 1,
                        ("-", "INVALID_ARGUMENT"): 2,  # empty prompt (before resolution), undecodable
                        ("medical", "INVALID_ARGUMENT"): 1,  # resolved, then too long for the context
                        ("-", "UNAUTHENTICATED"): 2, ("-", "CLIENT_STREAM_LIMIT"): 1,
                        ("medical", "EXPECTED_WAIT_EXCEEDS_DEADLINE"): 1, ("legal", "CANCELLED"): 1,
                        ("legal", "DEADLINE_EXCEEDED"): 2})

    def delta() -> Counter:
        after = requests_total(one_row)
        return Counter({k: v - before[k] for k, v in after.items() if v != before[k]})

    # Handlers may still be finishing after their callers gave up.
    assert wait_for(lambda: delta().total() >= expected.total())
    time.sleep(0.3)
    assert delta() == expected
    assert not one_row.server.access.open_calls
