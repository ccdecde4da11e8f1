"""The OpenAI-compatible HTTP front, called with the official `openai` package against a running
server: the same answers as gRPC (one servicer behind both), the same tokens and permissions, the
same stream limit, and OpenAI-shaped errors with the right HTTP status and our ErrorInfo reason."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai
import pytest

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from certs import make_pki
from loraserve.clients.client import LoraServeClient
from conftest import PROMPT, REPO, ServerThread, clone_adapter, comparable, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.scheduler.errors import InvalidArgument
from loraserve.server import openai_json as oj
from loraserve.server import http
from loraserve.server.http import ERRORS, Aborted, error_body
from loraserve.server.errors import rich_status, status_code
from loraserve.scheduler import errors as e
from test_lifecycle import wait_for

pytestmark = pytest.mark.slow
TOKENS = {"acme-token": {"client": "acme"}, "other-token": {"client": "other"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def front(demo_dir, tmp_path_factory):
    """A server with tokens, an adapter only acme may use, at most two open requests per client."""
    root = tmp_path_factory.mktemp("openai") / "adapters"
    shutil.copytree(demo_dir / "adapters", root)
    clone_adapter(demo_dir, root, "legal", "private", allowed_clients=["acme"])
    tokens = root.parent / "tokens.json"
    tokens.write_text(json.dumps({"tokens": TOKENS}))
    cfg = comparable(server_config(demo_dir, adapters_dir=str(root), auth_tokens_file=tokens,
                                   http_port=free_port(), max_streams_per_client=2))
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    srv = ServerThread(cfg, tracer_provider=provider)
    srv.spans = spans
    yield srv
    srv.stop()


def client(srv: ServerThread, token: str = "acme-token") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server.http_port}/v1", api_key=token, max_retries=0,
                         timeout=60)


def grpc_generate(srv: ServerThread, token: str = "acme-token", **fields) -> pb.GenerateResponse:
    with srv.channel() as ch:
        return inference_pb2_grpc.InferenceServiceStub(ch).Generate(
            pb.GenerateRequest(**fields), metadata=(("authorization", f"Bearer {token}"),), timeout=60)


def grpc_refuses(srv: ServerThread, **fields) -> str | None:
    """The field an INVALID_ARGUMENT answer to this gRPC request names, or None if it is served: a
    feature the gRPC edge does not have yet is refused there, and the HTTP front's tests of it skip."""
    try:
        grpc_generate(srv, **fields)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return exc.details()
        raise
    return None


# -- what is served, and how it is named -------------------------------------------------------------

def test_models_lists_base_and_every_id_the_caller_may_use(front):
    acme = {m.id: m for m in client(front).models.list()}
    assert {"base", "legal", "law", "legal@1", "medical", "clinic", "support", "helpdesk", "private",
            "private@1"} <= set(acme)
    assert acme["law"].root == "legal@1" and acme["base"].parent is None
    other = {m.id for m in client(front, "other-token").models.list()}
    assert "legal" in other and not {"private", "private@1"} & other  # its allowed_clients: acme only


def test_a_completion_is_the_grpc_answer_and_names_the_version_that_served(front):
    resp = client(front).completions.create(model="law", prompt=PROMPT, max_tokens=8)
    same = grpc_generate(front, adapter_id="law", prompt=PROMPT, max_new_tokens=8)
    assert resp.choices[0].text == same.text and resp.choices[0].text
    assert resp.model == "legal@1" and resp.object == "text_completion"
    assert resp.choices[0].finish_reason == {pb.FINISH_REASON_LENGTH: "length"}.get(same.finish_reason, "stop")
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (same.usage.input_tokens,
                                                                       same.usage.output_tokens)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.id.startswith("cmpl-") and resp.system_fingerprint.startswith("fp_")


def test_a_streamed_completion_adds_up_to_the_whole_one(front):
    whole = client(front).completions.create(model="medical", prompt=PROMPT, max_tokens=12, stop=["\n\n"])
    chunks = list(client(front).completions.create(model="medical", prompt=PROMPT, max_tokens=12, stop=["\n\n"],
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].model == "medical@1"  # known once the last message says which version served


def test_the_stream_ends_with_done(front):
    with httpx.stream("POST", f"http://127.0.0.1:{front.server.http_port}/v1/completions",
                      headers={"authorization": "Bearer acme-token"}, timeout=60,
                      json={"model": "base", "prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_a_chat_completion_renders_the_messages(front):
    messages = [{"role": "system", "content": "You answer legal questions."}, {"role": "user", "content": "Next?"}]
    if (why := grpc_refuses(front, adapter_id="legal", messages=[pb.Message(**m) for m in messages],
                            max_new_tokens=4)) is not None:
        pytest.skip(f"the gRPC edge does not serve messages on this branch ({why})")
    resp = client(front).chat.completions.create(model="legal", messages=messages, max_completion_tokens=6)
    assert resp.object == "chat.completion" and resp.model == "legal@1"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    chunks = list(client(front).chat.completions.create(model="legal", messages=messages, max_completion_tokens=6,
                                                        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == resp.choices[0].message.content


def test_logprobs_come_with_their_token_strings(front):
    served = grpc_generate(front, adapter_id="legal", prompt=PROMPT, max_new_tokens=4, logprobs=2)
    if not served.logprobs:
        pytest.skip("the engine returns no logprobs on this branch")
    resp = client(front).completions.create(model="legal", prompt=PROMPT, max_tokens=4, logprobs=2)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert lp.token_logprobs == pytest.approx([t.logprob for t in served.logprobs])


def test_n_choices_whole_and_streamed(front):
    sampled = dict(model="support", prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=11)
    whole = client(front).completions.create(**sampled)
    if len(whole.choices) == 1:
        pytest.skip("the gRPC edge answers n > 1 with one choice on this branch")
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = {0: "", 1: "", 2: ""}
    for chunk in client(front).completions.create(**sampled, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert list(texts.values()) == [c.text for c in whole.choices]
    assert chunk.usage.completion_tokens == whole.usage.completion_tokens


def test_token_ids_are_a_prompt(front):
    ids = [5, 6, 7, 8]
    if (why := grpc_refuses(front, adapter_id="base", prompt_token_ids=ids, max_new_tokens=2)) is not None:
        pytest.skip(f"the gRPC edge does not take prompt_token_ids on this branch ({why})")
    resp = client(front).completions.create(model="base", prompt=ids, max_tokens=2)
    assert resp.usage.prompt_tokens == len(ids)


# -- errors ---------------------------------------------------------------------------------------

def test_an_unknown_model_is_not_found(front):
    with pytest.raises(openai.NotFoundError) as err:
        client(front).completions.create(model="ghost", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "ADAPTER_NOT_FOUND" and err.value.body["param"] == "model"


def test_a_bad_token_is_refused_and_another_clients_adapter_forbidden(front):
    with pytest.raises(openai.AuthenticationError) as err:
        client(front, "wrong-token").completions.create(model="legal", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "UNAUTHENTICATED"
    with pytest.raises(openai.AuthenticationError):
        client(front, "wrong-token").models.list()
    garbled = httpx.post(f"http://127.0.0.1:{front.server.http_port}/v1/completions", content=b"{",
                         headers={"authorization": "Bearer wrong-token"})
    assert garbled.status_code == 401  # who is asking comes first, as on gRPC
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(front, "other-token").completions.create(model="private", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "PERMISSION_DENIED" and err.value.body["param"] == "model"
    assert client(front).completions.create(model="private", prompt=PROMPT, max_tokens=2).model == "private@1"


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"top_p": "high"}, "top_p"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"stop": [1, 2]}, "stop"),
])
def test_a_bad_field_is_400_naming_the_parameter(front, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client(front).completions.create(model="legal", prompt=PROMPT, **fields)
    assert err.value.body["param"] == param and err.value.body["code"] == "INVALID_ARGUMENT"


def test_tools_are_refused_rather_than_ignored(front):
    with pytest.raises(openai.BadRequestError) as err:
        client(front).chat.completions.create(model="legal", messages=[{"role": "user", "content": "hi"}],
                                              tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.body["param"] == "tools"


def test_the_stream_limit_is_shared_with_grpc_and_answers_429(front):
    long = dict(max_new_tokens=400, ignore_eos=True)
    with LoraServeClient(front.target, token="acme-token", timeout=60) as acme:
        streams = [acme.stream("base", PROMPT, **long) for _ in range(2)]
        [next(s) for s in streams]  # both admitted and streaming
        with pytest.raises(openai.RateLimitError) as err:
            client(front).completions.create(model="base", prompt=PROMPT, max_tokens=2)
        assert err.value.body["code"] == "CLIENT_STREAM_LIMIT" and err.value.response.headers["retry-after"]
        assert client(front, "other-token").completions.create(model="base", prompt=PROMPT, max_tokens=2)
        for s in streams:
            s.close()
    assert wait_for(lambda: not front.server.access.open_calls)


def test_http_calls_are_counted_in_the_same_metrics(front):
    requests = front.server.metrics.requests

    def served() -> float:
        return requests.labels("support", "OK")._value.get()

    before = served()
    client(front).completions.create(model="support", prompt=PROMPT, max_tokens=2)
    assert served() == before + 1


def test_an_http_span_is_the_parent_of_the_rpc_span(front):
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    front.spans.clear()
    client(front).completions.create(model="support", prompt=PROMPT, max_tokens=2,
                                     extra_headers={"traceparent": caller})
    with pytest.raises(openai.NotFoundError):
        client(front).completions.create(model="ghost", prompt=PROMPT, max_tokens=2)
    assert wait_for(lambda: len([s for s in front.spans.get_finished_spans() if s.name.startswith("POST")]) == 2)
    spans = front.spans.get_finished_spans()
    served, refused = [s for s in spans if s.name == "POST /v1/completions"]
    rpc = next(s for s in spans if s.name.endswith("InferenceService/Generate") and s.parent
               and s.parent.span_id == served.context.span_id)
    assert served.parent.span_id == 0xb7ad6b7169203331 and rpc.context.trace_id == served.context.trace_id
    assert served.attributes["http.response.status_code"] == 200
    assert refused.attributes["http.response.status_code"] == 404 and not refused.status.is_ok


def test_a_loading_server_answers_503(demo_dir):
    srv = ServerThread(server_config(demo_dir, http_port=free_port()), load=False)
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client(srv).completions.create(model="legal", prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "NOT_READY"
        with pytest.raises(openai.InternalServerError):
            client(srv).models.list()
    finally:
        srv.stop()


# -- the translation alone --------------------------------------------------------------------------

def test_the_json_becomes_the_grpc_request():
    call = oj.to_request({"model": "legal@1", "messages": [{"role": "developer", "content": "be brief"},
                                                            {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                         {"type": "text", "text": "b"}]}],
                          "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "\n",
                          "n": 2, "logprobs": True, "top_logprobs": 4, "presence_penalty": 0.1,
                          "frequency_penalty": -0.2, "user": "ignored", "stream": True,
                          "stream_options": {"include_usage": True},
                          "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                              "type": "object"}}}}, chat=True)
    r = call.request
    assert (r.adapter_id, r.max_new_tokens, r.seed, list(r.stop_sequences), r.n, r.logprobs) == \
        ("legal@1", 7, 3, ["\n"], 2, 4)
    assert [(m.role, m.content) for m in r.messages] == [("system", "be brief"), ("user", "ab")]
    assert r.temperature == pytest.approx(0.5) and r.frequency_penalty == pytest.approx(-0.2)
    assert json.loads(r.response_format.json_schema) == {"type": "object"}
    assert call.stream and call.include_usage and call.logprobs
    text = oj.to_request({"model": "base", "prompt": [[1, 2, 3]], "logprobs": 0,
                          "response_format": {"type": "json_object"}}, chat=False).request
    assert list(text.prompt_token_ids) == [1, 2, 3] and text.HasField("logprobs") and text.logprobs == 0
    assert text.response_format.HasField("json_object") and not text.HasField("temperature")
    with pytest.raises(InvalidArgument, match="prompt"):
        oj.to_request({"model": "base", "prompt": ["a", "b"]}, chat=False)
    with pytest.raises(InvalidArgument, match="top_logprobs"):
        oj.to_request({"model": "base", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, chat=True)


def test_every_status_the_service_answers_has_an_http_status():
    codes = {status_code(cls.__new__(cls)) for cls in vars(e).values()
             if isinstance(cls, type) and issubclass(cls, e.LoraServeError)}
    assert codes - {grpc.StatusCode.INTERNAL} <= set(ERRORS)
    exc = e.InvalidArgument("max_new_tokens", "too many")
    refused = Aborted(status_code(exc), exc.message, (("grpc-status-details-bin", rich_status(exc).SerializeToString()),))
    assert error_body(refused, chat=True)[:2] == (400, {"error": {
        "message": "max_new_tokens: too many", "type": "invalid_request_error", "param": "max_tokens",
        "code": "INVALID_ARGUMENT"}})


# -- start-up and shutdown --------------------------------------------------------------------------

def test_serve_says_how_to_call_the_http_front_and_sigterm_still_drains(demo_dir):
    """The `openai: try` line's curl works as printed; uvicorn takes no signal handler from the CLI,
    so SIGTERM drains and the process exits 0."""
    env = {**os.environ, "LORASERVE_PORT": "0", "LORASERVE_METRICS_PORT": "-1", "LORASERVE_HTTP_PORT": str(free_port()),
           "LORASERVE_MODEL_PATH": str(demo_dir / "base"), "LORASERVE_ADAPTERS_DIR": str(demo_dir / "adapters")}
    proc = subprocess.Popen([sys.executable, "-m", "loraserve.server.cli", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        assert wait_for(lambda: any(line.startswith("ready: ") for line in lines), 120), lines
        hint = next(line for line in lines if line.startswith("openai: try "))
        curl = re.search(r"`([^`]+)`", hint).group(1)
        tried = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
        assert json.loads(tried.stdout)["model"] == "legal@1", tried.stdout + tried.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, "".join(lines)


def test_a_stream_in_flight_finishes_when_the_server_stops(demo_dir):
    srv = ServerThread(server_config(demo_dir, http_port=free_port()))
    stream = client(srv).completions.create(model="base", prompt=PROMPT, max_tokens=200, stream=True,
                                            extra_body={"ignore_eos": True})
    first = next(iter(stream))
    stopping = threading.Thread(target=srv.stop)
    stopping.start()
    rest = list(stream)
    stopping.join(60)
    assert first.choices[0].text is not None and rest[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.APIConnectionError):
        client(srv).models.list()


def test_a_reused_connection_answers_without_waiting_for_a_delayed_ack(front):
    """Each answer is written as headers then body; without TCP_NODELAY the body of every answer
    on a kept-alive connection waits ~40 ms for the client's delayed ACK (Nagle). Noise only adds
    time, so the fastest of ten says whether that wait is there."""
    with httpx.Client(base_url=f"http://127.0.0.1:{front.server.http_port}/v1",
                      headers={"authorization": "Bearer acme-token"}) as http:
        took = []
        for _ in range(10):
            started = time.perf_counter()
            http.get("/models").raise_for_status()
            took.append(time.perf_counter() - started)
    assert min(took[1:]) < 0.03, took


def test_a_client_that_hangs_up_cancels_its_request(front):
    cancelled = front.server.metrics.requests.labels("base", "CANCELLED")
    before = cancelled._value.get()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"http://127.0.0.1:{front.server.http_port}/v1/completions", timeout=0.5,
                   headers={"authorization": "Bearer acme-token"},
                   json={"model": "base", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True})
    assert wait_for(lambda: cancelled._value.get() == before + 1)
    assert wait_for(lambda: front.server.scheduler.running == 0 and not front.server.access.open_calls)
    stream = client(front).completions.create(model="base", prompt=PROMPT, max_tokens=480, stream=True,
                                              extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # mid-stream
    assert wait_for(lambda: cancelled._value.get() == before + 2)
    assert wait_for(lambda: front.server.scheduler.running == 0 and not front.server.access.open_calls)


def _logprobs(*tokens: str) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=i, token=t, logprob=-0.5 * i, rank=1,
                            top=[pb.TopLogprob(token_id=i, token=t, logprob=-0.5 * i),
                                 pb.TopLogprob(token_id=99, token="x", logprob=-3.0)])
            for i, t in enumerate(tokens)]


def test_answers_have_the_sdks_shapes_with_choices_and_logprobs():
    """What the engine does not fill on every branch yet (n > 1, logprobs), shaped from the
    contract's messages and parsed by the SDK's own models."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    adapter, usage = pb.AdapterInfo(id="legal", version="3"), pb.Usage(input_tokens=5, output_tokens=4)
    resp = pb.GenerateResponse(request_id="r1", text="Hi!", finish_reason=pb.FINISH_REASON_EOS, usage=usage,
                               adapter=adapter, choices=[
                                   pb.Choice(index=0, text="Hi!", finish_reason=pb.FINISH_REASON_EOS,
                                             logprobs=_logprobs("Hi", "!")),
                                   pb.Choice(index=1, text="Yo", finish_reason=pb.FINISH_REASON_LENGTH,
                                             logprobs=_logprobs("Yo"))])
    chat = oj.to_request({"model": "law", "messages": [{"role": "user", "content": "a"}], "n": 2,
                          "logprobs": True, "top_logprobs": 2, "stream": True,
                          "stream_options": {"include_usage": True}}, chat=True)
    answer = ChatCompletion.model_validate(oj.completion(chat, resp, 1, "fp_x"))
    assert [c.message.content for c in answer.choices] == ["Hi!", "Yo"] and answer.model == "legal@3"
    assert [t.token for t in answer.choices[0].logprobs.content] == ["Hi", "!"]
    assert answer.choices[0].logprobs.content[1].top_logprobs[1].token == "x"
    assert [c.finish_reason for c in answer.choices] == ["stop", "length"] and answer.id == "chatcmpl-r1"
    text = oj.to_request({"model": "law", "prompt": "a", "logprobs": 2}, chat=False)
    plain = Completion.model_validate(oj.completion(text, resp, 1, None))
    assert plain.choices[0].logprobs.text_offset == [0, 2] and plain.choices[0].logprobs.top_logprobs[0]["x"] == -3

    chunks = oj.Chunks(chat, 1, "fp_x")
    stream = [pb.GenerateStreamResponse(request_id="r1", index=0, text="Hi", logprobs=_logprobs("Hi")),
              pb.GenerateStreamResponse(request_id="r1", index=1, text="Yo", logprobs=_logprobs("Yo")),
              pb.GenerateStreamResponse(request_id="r1", index=1, finish_reason=pb.FINISH_REASON_LENGTH,
                                        usage=pb.Usage(input_tokens=5, output_tokens=1), adapter=adapter),
              pb.GenerateStreamResponse(request_id="r1", index=0, text="!", finish_reason=pb.FINISH_REASON_EOS,
                                        usage=pb.Usage(input_tokens=5, output_tokens=2), adapter=adapter)]
    out = [ChatCompletionChunk.model_validate(c) for c in map(chunks.chunk, stream)]
    out.append(ChatCompletionChunk.model_validate(chunks.usage_chunk()))
    assert [(c.choices[0].index, c.choices[0].delta.role, c.choices[0].delta.content) for c in out[:4]] == [
        (0, "assistant", "Hi"), (1, "assistant", "Yo"), (1, None, None), (0, None, "!")]
    assert out[0].model == "law" and out[3].model == "legal@3" and out[0].choices[0].logprobs.content[0].token == "Hi"
    assert out[-1].choices == [] and (out[-1].usage.prompt_tokens, out[-1].usage.completion_tokens) == (5, 3)


def test_with_tls_the_http_front_is_https_with_the_same_certificates(demo_dir, tmp_path):
    """--tls-client-ca makes it mutual there too: no client certificate, no connection."""
    pki = make_pki(tmp_path)
    srv = ServerThread(server_config(demo_dir, http_port=free_port(), tls_cert=pki.server_cert,
                                     tls_key=pki.server_key, tls_client_ca=pki.ca), load=False)
    url = f"https://localhost:{srv.server.http_port}/v1/models"
    try:
        with httpx.Client(verify=ssl_context(pki, with_client_cert=True)) as https:
            assert https.get(url).json()["error"]["code"] == "NOT_READY"  # reached, over mTLS
        with pytest.raises(httpx.HTTPError), httpx.Client(verify=ssl_context(pki, with_client_cert=False)) as https:
            https.get(url)
    finally:
        srv.stop()


def ssl_context(pki, with_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def test_listed_models_are_every_id_a_request_may_name():
    listed = pb.ListModelsResponse(base=pb.BaseModel(id="demo-base", max_context=512), adapters=[
        pb.ServedModel(id="legal", version="2", aliases=["law"], versions=["3"]),  # 3 is staging
        pb.ServedModel(id="draft", versions=["1"])])  # nothing active: only by version
    models = {m["id"]: m for m in oj.models(listed)}
    assert list(models) == ["base", "legal", "law", "legal@2", "legal@3", "draft@1"]
    assert models["law"]["root"] == "legal@2" and models["base"]["root"] == "demo-base"
    assert {m["max_model_len"] for m in models.values()} == {512}


def test_an_http_port_in_use_is_refused_saying_what_to_do():
    """LoraServer.start binds it first, so start-up stops there, before gRPC listens."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="--http-port chooses another port, 0 turns it off"):
            http.bind("127.0.0.1", taken.getsockname()[1])
