"""Fuzz every GenerateRequest field and the call metadata against a running demo server: each
answer is OK or a status the error table of docs/api.md lists, with ErrorInfo; never UNKNOWN or
INTERNAL. Afterwards the server is SERVING and answers a fixed request as it did before."""

from __future__ import annotations

import json
import re

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

# A test-only package the CUDA machine may lack (docs/performance.md "Running the suite on CUDA").
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import ADAPTERS, PROMPT, REPO, ServerThread, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.server.errors import DOMAIN
from test_lifecycle import health

TOKEN = "fuzz-token"
GENERATE = "/loraserve.v1.InferenceService/Generate"


def documented_errors() -> set[tuple[str, str]]:
    """(status, ErrorInfo reason) pairs from docs/api.md's error table ("same": the reason is the status)."""
    text = (REPO / "docs" / "api.md").read_text()
    table = text[text.index("| status | ErrorInfo reason | when |"):]
    table = table[:table.index("\n\n")]
    pairs = set()
    for row in table.splitlines()[2:]:
        statuses, reasons = (cell.strip() for cell in row.strip("|").split("|")[:2])
        for status in statuses.split(" / "):
            named = re.findall(r"`([A-Z_]+)`", reasons.split("(")[0])
            pairs.update((status, r) for r in (named or ([status] if reasons == "same" else [])))
    return pairs


ALLOWED = documented_errors()


def mostly(usual: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """The usual values three times in four, so most examples get past validation to the model."""
    return st.integers(0, 3).flatmap(lambda n: wild if n == 3 else usual)


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
usual_float = st.none() | st.sampled_from([0.0, 0.5, 1.0, 2.0])
# Each field: (usual values, wild ones). An example sends usual values but for up to two wild fields,
# so most examples reach the model and every field is fuzzed both alone and with another.
FIELDS = {
    "request_id": (st.just(""), st.text(max_size=140)),
    "adapter_id": (st.sampled_from([*ADAPTERS, "base", "legal@1"]),
                   st.sampled_from(["legal@99", "ghost", "", "legal\n"]) | st.text(max_size=70)),
    "prompt": (st.just(PROMPT), st.just("") | st.text(max_size=120)),
    "max_new_tokens": (st.integers(0, 3), st.sampled_from([512, 513, 2**32 - 1]) | st.integers(513, 2**32 - 1)),
    "temperature": (usual_float, st.floats(width=32)),
    "top_p": (usual_float, st.floats(width=32)),
    "top_k": (st.none() | st.integers(0, 50), st.integers(0, 2**32 - 1)),
    "seed": (st.none() | st.integers(0, 1000), st.integers(0, 2**64 - 1)),
    "stop_sequences": (st.lists(st.sampled_from(["\n", "Question:", "."]), max_size=2),
                       st.lists(st.text(max_size=70), max_size=10)),
    "ignore_eos": (st.booleans(), st.booleans()),
    "fallback": (st.sampled_from([0, 1, 2]), st.integers(-3, 9)),
}
requests = st.sets(st.sampled_from(sorted(FIELDS)), max_size=2).flatmap(lambda wild: st.fixed_dictionaries(
    {name: pair[name in wild] for name, pair in FIELDS.items()}))
metadata = st.tuples(
    mostly(st.just(f"Bearer {TOKEN}"), st.none() | printable | printable.map("Bearer {}".format)),
    mostly(st.none(), st.sampled_from(ADAPTERS) | printable),  # x-adapter-id: one adapter, maybe another, or junk
    st.dictionaries(st.from_regex(r"x-[a-z0-9_.-]{1,12}", fullmatch=True).filter(lambda k: not k.endswith("-bin")),
                    printable, max_size=3),
    st.dictionaries(st.from_regex(r"x-[a-z0-9]{1,8}-bin", fullmatch=True), st.binary(max_size=16), max_size=2),
)


def build(fields: dict) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})


def call_metadata(authorization, routed, text_keys, binary_keys) -> tuple:
    pairs = [("authorization", authorization)] if authorization is not None else []
    if routed is not None:
        pairs.append(("x-adapter-id", routed))
    return (*pairs, *text_keys.items(), *binary_keys.items())


def check(err: grpc.RpcError) -> None:
    code = err.code().name
    assert code not in ("UNKNOWN", "INTERNAL"), err.details()
    details = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert details is not None, f"{code} without ErrorInfo: {err.details()}"
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status_pb2.Status.FromString(details).details)
    assert info.domain == DOMAIN and (code, info.reason) in ALLOWED, (code, info.reason, err.details())


@pytest.fixture(scope="module")
def fuzzed(demo_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {TOKEN: {"client": "fuzzer"}}}))
    srv = ServerThread(server_config(demo_dir, auth_tokens_file=tokens, default_max_new_tokens=3))
    yield srv
    srv.stop()


def test_the_readme_lists_the_errors_the_fuzzer_accepts():
    assert {("INVALID_ARGUMENT", "INVALID_ARGUMENT"), ("UNAUTHENTICATED", "UNAUTHENTICATED"),
            ("NOT_FOUND", "ADAPTER_NOT_FOUND"), ("RESOURCE_EXHAUSTED", "CLIENT_STREAM_LIMIT")} <= ALLOWED


def test_fuzzed_requests_get_listed_statuses_and_leave_the_server_as_it_was(fuzzed):
    fixed = pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=8)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with fuzzed.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        alone = stub.Generate(fixed, metadata=auth, timeout=60)
        raw = channel.unary_unary(GENERATE)

        @settings(max_examples=80, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(fields=requests, meta=metadata, streaming=st.booleans(),
               garbage=mostly(st.none(), st.binary(max_size=40)))  # raw bytes, sent as they are
        def one(fields, meta, streaming, garbage):
            md = call_metadata(*meta)
            try:
                if garbage is not None:
                    raw(garbage, metadata=md, timeout=60)
                elif streaming:
                    list(stub.GenerateStream(build(fields), metadata=md, timeout=60))
                else:
                    stub.Generate(build(fields), metadata=md, timeout=60)
            except grpc.RpcError as err:
                check(err)

        one()
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        again = stub.Generate(fixed, metadata=auth, timeout=60)
    assert (again.text, again.usage.output_tokens) == (alone.text, alone.usage.output_tokens)
