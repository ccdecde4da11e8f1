"""TLS and mTLS, the access interceptor, and the limits every request meets."""

from __future__ import annotations

import json

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from certs import make_pki
from loraserve.clients.client import LoraServeClient, RequestFailed
from conftest import PROMPT, ServerThread, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from test_lifecycle import SERVING, health, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _credentials(pki, with_client_cert: bool) -> grpc.ChannelCredentials:
    if not with_client_cert:
        return grpc.ssl_channel_credentials(pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(),
                                        pki.client_cert.read_bytes())


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_serves_only_encrypted_and_mtls_only_known_clients(demo_dir, pki, mutual):
    cfg = server_config(demo_dir, tls_cert=pki.server_cert, tls_key=pki.server_key,
                        tls_client_ca=pki.ca if mutual else None, health_port=0)
    srv = ServerThread(cfg)
    try:
        with LoraServeClient(srv.target, credentials=_credentials(pki, True), timeout=30) as client:
            assert client.generate("legal", PROMPT, max_new_tokens=4).output_tokens == 4
        with LoraServeClient(srv.target, credentials=_credentials(pki, False), timeout=10) as client:
            if mutual:
                with pytest.raises(RequestFailed) as refused:
                    client.generate("legal", PROMPT, max_new_tokens=4)
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            else:
                assert client.generate("legal", PROMPT, max_new_tokens=4).output_tokens == 4
        with LoraServeClient(srv.target, timeout=10) as plaintext, pytest.raises(RequestFailed) as refused:
            plaintext.generate("legal", PROMPT, max_new_tokens=4)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        # What a Kubernetes gRPC probe does: plaintext, no certificate, health alone on its own port.
        with grpc.insecure_channel(f"127.0.0.1:{srv.server.health_port}") as probe:
            assert health(probe) == SERVING
            with pytest.raises(grpc.RpcError) as other:
                inference_pb2_grpc.InferenceServiceStub(probe).Generate(
                    pb.GenerateRequest(adapter_id="legal", prompt=PROMPT), timeout=10)
            assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop()


TOKENS = {"noisy-token": {"client": "noisy"}, "quiet-token": {"client": "quiet"}}


@pytest.fixture(scope="module")
def guarded(demo_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    srv = ServerThread(server_config(demo_dir, auth_tokens_file=tokens, max_streams_per_client=2,
                                     max_message_bytes=4096))
    yield srv
    srv.stop()


def test_reflection_needs_no_token(guarded):
    with grpc.insecure_channel(guarded.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "loraserve.v1.InferenceService" in services


def test_stream_limit_per_client_with_retry_info(guarded):
    long = dict(max_new_tokens=400, ignore_eos=True)
    with LoraServeClient(guarded.target, token="noisy-token", timeout=60) as noisy, \
            LoraServeClient(guarded.target, token="quiet-token", timeout=60) as quiet:
        streams = [noisy.stream("base", PROMPT, **long) for _ in range(2)]
        [next(s) for s in streams]  # both admitted and streaming
        with pytest.raises(RequestFailed) as refused:
            noisy.generate("base", PROMPT, max_new_tokens=2)
        assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                              "CLIENT_STREAM_LIMIT")
        assert quiet.generate("base", PROMPT, max_new_tokens=2).output_tokens == 2  # others are unaffected
        for s in streams:
            s.close()
    interceptor = guarded.server.access
    assert wait_for(lambda: not interceptor.open_calls)
    with LoraServeClient(guarded.target, token="noisy-token", timeout=60) as noisy:
        assert noisy.generate("base", PROMPT, max_new_tokens=2).output_tokens == 2


def test_retry_info_is_attached_to_resource_exhausted(guarded):
    with grpc.insecure_channel(guarded.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        meta = (("authorization", "Bearer noisy-token"),)
        calls = [stub.GenerateStream(pb.GenerateRequest(adapter_id="base", prompt=PROMPT, max_new_tokens=400,
                                                        ignore_eos=True), metadata=meta, timeout=60)
                 for _ in range(2)]
        [next(c) for c in calls]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb.GenerateRequest(adapter_id="base", prompt=PROMPT), metadata=meta, timeout=10)
        status = status_pb2.Status.FromString(dict(refused.value.trailing_metadata())["grpc-status-details-bin"])
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert retry, "RESOURCE_EXHAUSTED must say when to retry"
        for c in calls:
            c.cancel()


def test_oversized_message_is_refused_and_the_server_lives_on(guarded):
    with LoraServeClient(guarded.target, token="quiet-token", timeout=10) as client:
        with pytest.raises(RequestFailed) as refused:
            client.generate("base", "word " * 2000)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.generate("base", PROMPT, max_new_tokens=2).output_tokens == 2


@pytest.mark.parametrize("adapter_id", ["../../etc/passwd", "/var/demo/adapters/legal/1", "legal/1", "C:\\legal"])
def test_no_request_can_name_a_path(guarded, adapter_id):
    with LoraServeClient(guarded.target, token="quiet-token", timeout=10) as client:
        with pytest.raises(RequestFailed) as refused:
            client.generate(adapter_id, PROMPT)
    assert (refused.value.code, refused.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "adapter_id")


def test_routing_metadata_must_match_the_adapter(guarded):
    with grpc.insecure_channel(guarded.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT),
                          metadata=(("authorization", "Bearer quiet-token"), ("x-adapter-id", "medical")), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-adapter-id" in refused.value.details()
