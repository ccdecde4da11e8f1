"""End to end through gRPC on the trained demo model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ADAPTERS, PROMPT
from loraserve.v1 import inference_pb2 as pb
from loraserve.runner.demo import DOMAINS

PROMPTS = [PROMPT, "Question: Is this normal?\nAnswer:", "Question: Tell me more.\nAnswer:",
           "Question: Why did this happen?\nAnswer:"]


def gen(stub, adapter, prompt=PROMPT, **kw):
    return stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=prompt, **kw), timeout=60)


def details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, str]:
    status = status_pb2.Status()
    status.ParseFromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    info, bad, field = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), ""
    for d in status.details:
        if not d.Unpack(info) and d.Unpack(bad):
            field = bad.field_violations[0].field
    return info, field


def _domain_words(domain: str) -> set[str]:
    return {w.strip(".,").lower() for part in DOMAINS[domain].values() for phrase in part for w in phrase.split()}


_OWN_WORDS = {d: _domain_words(d) - set.union(*(_domain_words(o) for o in DOMAINS if o != d)) for d in DOMAINS}


def in_own_domain(adapter: str, text: str) -> bool:
    """Whether `text` holds more words of `adapter`'s own training vocabulary (words no other
    domain's training text uses) than of any other domain's. Scored against the whole
    vocabulary, not a few hand-picked words or sentences, so it holds for any demo build that
    learned its domains: one trained on another machine's BLAS answers with other sentences of
    the same domain, or misspells one ("The nurse reports a dailyld to a follow-up visit")."""
    words = {w.strip(".,:").lower() for w in text.split()}
    scores = {d: len(words & own) for d, own in _OWN_WORDS.items()}
    return scores[adapter] > max(v for d, v in scores.items() if d != adapter)


def test_each_adapter_answers_in_its_own_domain(stub):
    texts = {a: gen(stub, a, max_new_tokens=40).text for a in (*ADAPTERS, "base")}
    for adapter, text in texts.items():
        assert in_own_domain(adapter, text), (adapter, text)
    assert len(set(texts.values())) == 4


def test_concurrent_mixed_requests_match_the_same_request_served_alone(stub, server):
    cases = [(adapter, prompt) for adapter in (*ADAPTERS, "base") for prompt in PROMPTS] * 3  # 48 requests
    alone = {}
    for adapter, prompt in set(cases):
        alone[adapter, prompt] = gen(stub, adapter, prompt, max_new_tokens=24)
    batches_before = server.server.scheduler.stats.batches
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: gen(stub, c[0], c[1], max_new_tokens=24), cases))
    for (adapter, prompt), resp in zip(cases, together):
        assert resp.adapter.id == adapter
        assert resp.text == alone[adapter, prompt].text, (adapter, prompt)
        assert resp.usage.output_tokens == alone[adapter, prompt].usage.output_tokens
    # They really were batched: far fewer batches than requests.
    assert server.server.scheduler.stats.batches - batches_before < len(cases) / 2


def test_response_reports_adapter_usage_and_timings(stub):
    resp = gen(stub, "legal", max_new_tokens=8, request_id="rid-1")
    assert resp.request_id == "rid-1"
    assert (resp.adapter.id, resp.adapter.version) == ("legal", "1")
    assert resp.adapter.load_source in (pb.LOAD_SOURCE_DISK, pb.LOAD_SOURCE_VRAM)
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens == 8
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert resp.timings.prefill_ms > 0 and resp.timings.decode_ms > 0
    again = gen(stub, "legal", max_new_tokens=8)
    assert again.adapter.load_source == pb.LOAD_SOURCE_VRAM and again.timings.load_ms == 0


def test_stream_concatenates_to_the_unary_answer(stub):
    unary = gen(stub, "support", max_new_tokens=30)
    chunks = list(stub.GenerateStream(pb.GenerateRequest(adapter_id="support", prompt=PROMPT, max_new_tokens=30),
                                      timeout=60))
    assert len(chunks) > 2
    assert chunks[0].request_id and len({c.request_id for c in chunks}) == 1
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].usage.output_tokens == unary.usage.output_tokens and chunks[-1].adapter.id == "support"


def test_stop_sequence_cuts_before_the_match(stub):
    full = gen(stub, "medical", max_new_tokens=40).text
    stop = full.split()[2]
    resp = gen(stub, "medical", max_new_tokens=40, stop_sequences=[stop])
    assert resp.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert resp.text == full[:full.index(stop)]


def test_seeded_sampling_is_reproducible(stub):
    a = gen(stub, "legal", max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    b = gen(stub, "legal", max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    assert a.text == b.text and a.usage.output_tokens > 0


def test_unknown_adapter_is_not_found_with_error_info(stub):
    with pytest.raises(grpc.RpcError) as caught:
        gen(stub, "nonexistent")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info, _ = details(caught.value)
    assert info.reason == "ADAPTER_NOT_FOUND" and info.metadata["adapter_id"] == "nonexistent"
    assert info.domain == "loraserve.v1"


@pytest.mark.parametrize("fields, bad_field", [
    (dict(adapter_id=""), "adapter_id"),
    (dict(adapter_id="../legal"), "adapter_id"),
    (dict(adapter_id="/etc/passwd"), "adapter_id"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="word " * 3000), "prompt"),
    (dict(max_new_tokens=100_000), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop_sequences=[""]), "stop_sequences"),
    (dict(stop_sequences=["x"] * 20), "stop_sequences"),
    (dict(request_id="r" * 500), "request_id"),
])
def test_bad_fields_are_invalid_argument_naming_the_field(stub, server, fields, bad_field):
    request = dict(adapter_id="legal", prompt=PROMPT, max_new_tokens=4)
    request.update(fields)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(**request), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field in caught.value.details()
    info, field = details(caught.value)
    assert field == bad_field and info.metadata["field"] == bad_field
    # The server stays healthy and keeps answering.
    with server.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert gen(stub, "legal", max_new_tokens=2).usage.output_tokens == 2


def test_stream_errors_use_the_same_statuses(stub):
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateStream(pb.GenerateRequest(adapter_id="missing", prompt=PROMPT), timeout=30))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
