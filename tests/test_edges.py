"""Strict edges: whole-id matching, the model's context, undecodable requests, tokens that
cannot travel as metadata, and the operator's trusted client-id key."""

from __future__ import annotations

import json

import grpc
import pytest

from loraserve.clients.client import LoraServeClient, RequestFailed
from conftest import PROMPT, ServerThread, server_config
from loraserve.v1 import admin_pb2, admin_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.server.app import engine_config
from loraserve.scheduler.errors import Unauthenticated
from loraserve.server.auth import Authenticator
from loraserve.server.cli import main as cli_main
from test_lifecycle import PacedEngine, wait_for

GENERATE = "/loraserve.v1.InferenceService/Generate"
STREAM = "/loraserve.v1.InferenceService/GenerateStream"


def refused(call) -> RequestFailed:
    with pytest.raises(RequestFailed) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("adapter_id", ["legal\n", "legal\r\n", " legal", "legal@1\n", "legal\x00"])
def test_adapter_ids_are_matched_whole(server, adapter_id):
    # A plain stub: LoraServeClient also sends the id as routing metadata, which gRPC refuses to carry.
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            pb.GenerateRequest(adapter_id=adapter_id, prompt=PROMPT, max_new_tokens=2), timeout=30)
    err = RequestFailed.from_rpc_error(caught.value)
    assert (err.code, err.reason, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "adapter_id")


def prompt_of(server, n_tokens: int) -> str:
    """A prompt the demo tokenizer turns into exactly n_tokens tokens."""
    encode = server.server.engine.encode
    words = n_tokens
    while len(encode(" ".join(["ok"] * words))) > n_tokens:
        words -= 1
    text = " ".join(["ok"] * words)
    assert len(encode(text)) == n_tokens
    return text


def test_prompt_and_new_tokens_must_fit_the_model_context(server):
    context = server.server.engine.max_context
    with server.channel() as channel:
        stats = admin_pb2_grpc.AdapterAdminServiceStub(channel).GetCacheStats(admin_pb2.GetCacheStatsRequest(),
                                                                               timeout=10)
    assert stats.max_context_tokens == context == 512  # the demo model's max_position_embeddings
    engine = server.server.engine
    assert stats.kv_pool_bytes == engine.kv_bytes() > 0
    assert (stats.kv_blocks_total, stats.kv_block_size) == (engine.kv_blocks, engine.kv_block_size)
    assert stats.kv_pool_tokens == engine.kv_blocks * engine.kv_block_size > 0
    assert stats.kv_blocks_used == stats.kv_tokens_held == 0  # nothing running
    assert stats.kv_blocks_cached <= stats.kv_blocks_total
    assert stats.prefix_cache_hit_tokens <= stats.prefix_cache_queried_tokens
    assert stats.kv_slots == stats.kv_slots_in_use == 0  # deprecated
    with LoraServeClient(server.target, timeout=60) as client:
        # The case: within max_prompt_tokens (1024) and max_new_tokens_limit (512), over the context.
        err = refused(lambda: client.generate("legal", prompt_of(server, 1020), max_new_tokens=512))
        assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "prompt")
        err = refused(lambda: client.generate("legal", prompt_of(server, 500), max_new_tokens=13))
        assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens")
        assert "512" in err.message
        full = client.generate("legal", prompt_of(server, 500), max_new_tokens=12, ignore_eos=True)
        assert full.output_tokens == 12


def _raw(channel: grpc.Channel, method: str, body: bytes, streaming: bool):
    """Send bytes as they are, as a broken or hostile client would."""
    if streaming:
        return list(channel.unary_stream(method)(body, timeout=10))
    return channel.unary_unary(method)(body, timeout=10)


BAD_UTF8_PROMPT = b"\x12\x05legal" + b"\x1a\x02\xff\xfe"  # adapter_id="legal", prompt=<invalid UTF-8>
CORRUPT = b"\x12\x50legal"  # a length running past the end of the message


@pytest.mark.parametrize("body", [BAD_UTF8_PROMPT, CORRUPT], ids=["invalid-utf8", "truncated"])
@pytest.mark.parametrize("method", [GENERATE, STREAM], ids=["unary", "stream"])
def test_undecodable_requests_are_invalid_argument(server, body, method):
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        _raw(channel, method, body, streaming=method == STREAM)
    err = RequestFailed.from_rpc_error(caught.value)
    assert (err.code, err.reason, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "request")
    assert "Traceback" not in err.message and "DecodeError" not in err.message
    with server.channel() as channel:  # the well-formed twin is served
        assert _raw(channel, GENERATE, pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=2)
                    .SerializeToString(), streaming=False)


@pytest.mark.parametrize("token", ["tökén", "two\nlines", " padded ", ""])
def test_a_token_that_cannot_be_sent_as_metadata_stops_start_up(demo_dir, tmp_path, capsys, token):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"good-token": {"client": "a"}, token: {"client": "b"}}}))
    with pytest.raises(ValueError, match="token #2 cannot be sent as gRPC metadata"):
        Authenticator.from_file(tokens)
    code = cli_main(["serve", "--model-path", str(demo_dir / "base"), "--adapters-dir", str(demo_dir / "adapters"),
                     "--auth-tokens-file", str(tokens)])
    assert code == 2 and "cannot be sent as gRPC metadata" in capsys.readouterr().err


@pytest.mark.parametrize("content", ['{"tokens": {"t": {}}}', '{"tokens": ["t"]}', "not json",
                                     '{"tokens": {"t": {"client": "a", "admin": "yes"}}}'])
def test_a_malformed_tokens_file_stops_start_up(tmp_path, content):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(content)
    with pytest.raises(ValueError, match=str(tokens)):
        Authenticator.from_file(tokens)


@pytest.mark.parametrize("value", ["Bearer tökén", "Bearer \u2603", "Bearer a\x00b", "Bearer ", "Basic x"])
def test_any_unusable_bearer_value_is_unauthenticated(tmp_path, value):
    # grpc hands a handler non-ASCII header bytes as text; compare_digest refuses such text with a TypeError.
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"good-token": {"client": "a"}}}))
    auth = Authenticator.from_file(tokens)
    with pytest.raises(Unauthenticated):
        auth.identify([("authorization", value)])
    assert auth.identify([("authorization", "Bearer good-token")]).client == "a"


@pytest.fixture(scope="module")
def proxied(demo_dir):
    cfg = server_config(demo_dir, client_id_metadata_key="x-client-id", max_streams_per_client=1)
    srv = ServerThread(cfg, engine=PacedEngine(engine_config(cfg)))
    yield srv
    srv.stop()


def test_a_trusted_metadata_key_separates_clients_behind_one_address(proxied):
    with proxied.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        long = pb.GenerateRequest(adapter_id="base", prompt=PROMPT, max_new_tokens=400, ignore_eos=True)
        short = pb.GenerateRequest(adapter_id="base", prompt=PROMPT, max_new_tokens=2)
        held = stub.GenerateStream(long, metadata=(("x-client-id", "team-a"),), timeout=60)
        next(held)
        assert proxied.server.access.open_calls == {"team-a": 1}
        with pytest.raises(grpc.RpcError) as limited:
            stub.Generate(short, metadata=(("x-client-id", "team-a"),), timeout=30)
        assert RequestFailed.from_rpc_error(limited.value).reason == "CLIENT_STREAM_LIMIT"
        # Same address, another client: its own limit. No key: the address is the client.
        assert stub.Generate(short, metadata=(("x-client-id", "team-b"),), timeout=30).usage.output_tokens == 2
        assert stub.Generate(short, timeout=30).usage.output_tokens == 2
        with pytest.raises(grpc.RpcError) as too_long:
            stub.Generate(short, metadata=(("x-client-id", "x" * 129),), timeout=30)
        assert RequestFailed.from_rpc_error(too_long.value).field == "x-client-id"
        held.cancel()
    assert wait_for(lambda: not proxied.server.access.open_calls)
