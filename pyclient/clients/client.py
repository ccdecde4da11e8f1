"""Typed clients over the generated stubs.

    with LoraServeClient("localhost:50051") as c:
        print(c.generate("legal", "Question: What now?\\nAnswer:").text)

Every call carries the adapter id as `x-adapter-id` metadata, so a proxy or the channel's
ring_hash policy can keep each adapter on one replica (clients/affinity.py). Failures raise
RequestFailed with the gRPC code and the server's ErrorInfo reason.

One implementation (_Client builds each call and reads its answer); each flavour only calls or awaits it.
The sync client keeps its own sync channel rather than driving the async one from a hidden loop thread:
no extra thread or event loop, so it behaves as before inside a running loop, in threads and after fork.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import ModuleType
from typing import AsyncIterator, Callable, Iterator, NamedTuple, Sequence

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from loraserve.contract import ROUTING_HEADER
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    """The token's own text (a byte-level token may be part of a character)."""
    logprob: float | None
    """Natural log; None for a prompt's first token (no context)."""
    rank: int
    top: list[tuple[int, str, float]] = field(default_factory=list)
    """The most likely (token_id, token, logprob) at this place, most likely first."""

    @classmethod
    def from_pb(cls, msg: pb.TokenLogprob) -> TokenLogprob:
        return cls(msg.token_id, msg.token, msg.logprob if msg.HasField("logprob") else None, msg.rank,
                   [(t.token_id, t.token, t.logprob) for t in msg.top])


def _logprobs(msgs) -> list[TokenLogprob]:
    return [TokenLogprob.from_pb(m) for m in msgs]


def _finish(reason: int) -> str:
    return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


@dataclass(frozen=True)
class Choice:
    """One of n completions (n > 1)."""

    index: int
    text: str
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class GenerateResult:
    request_id: str
    text: str
    finish_reason: str
    """length | eos | stop_sequence"""
    input_tokens: int
    output_tokens: int
    adapter_id: str
    adapter_version: str
    load_source: str
    """vram | ram | disk | remote"""
    timings_ms: dict[str, float] = field(default_factory=dict)
    cost_ms: dict[str, float] = field(default_factory=dict)
    """The request's share of the engine's prefill and decode steps and of its adapter's load."""
    cached_input_tokens: int = 0
    """Of input_tokens, those served from KV blocks shared with an earlier prompt (the prefix cache)."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per generated token when `logprobs` was asked for."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per prompt token when `prompt_logprobs` was asked for."""
    choices: list[Choice] = field(default_factory=list)
    """Every completion when n > 1 (choices[0] is the text above); usage counts them all."""

    @classmethod
    def from_pb(cls, msg: pb.GenerateResponse | pb.GenerateStreamResponse, text: str,
                token_ids: Sequence[int] | None = None, logprobs: list[TokenLogprob] | None = None,
                prompt_logprobs: list[TokenLogprob] | None = None) -> GenerateResult:
        """A stream's result passes what its deltas carried; a response's are read from it."""
        unary = isinstance(msg, pb.GenerateResponse)
        return cls(
            request_id=msg.request_id, text=text, finish_reason=_finish(msg.finish_reason),
            input_tokens=msg.usage.input_tokens, output_tokens=msg.usage.output_tokens,
            adapter_id=msg.adapter.id, adapter_version=msg.adapter.version,
            load_source=pb.LoadSource.Name(msg.adapter.load_source).removeprefix("LOAD_SOURCE_").lower(),
            timings_ms={"queue": msg.timings.queue_ms, "load": msg.timings.load_ms,
                        "prefill": msg.timings.prefill_ms, "decode": msg.timings.decode_ms},
            cost_ms={"prefill_device": msg.usage.prefill_device_ms, "decode_device": msg.usage.decode_device_ms,
                     "adapter_load": msg.usage.adapter_load_ms},
            cached_input_tokens=msg.usage.cached_input_tokens,
            token_ids=list(msg.token_ids if unary else token_ids or ()),
            logprobs=_logprobs(msg.logprobs) if unary else logprobs or [],
            prompt_logprobs=_logprobs(msg.prompt_logprobs) if unary else prompt_logprobs or [],
            choices=[Choice(c.index, c.text, _finish(c.finish_reason), list(c.token_ids), _logprobs(c.logprobs))
                     for c in msg.choices] if unary else [],
        )


@dataclass(frozen=True)
class Tokenized:
    token_ids: list[int]
    offsets: list[tuple[int, int]]
    """Each token's [start, end) in `text`, in characters."""
    text: str
    """What was tokenized: the text, or the messages as the base's chat template renders them."""


@dataclass(frozen=True)
class ServedModel:
    id: str
    version: str
    """The version a request naming `id` (or an alias) is served by; "" when none is active."""
    aliases: list[str]
    versions: list[str]
    """Other versions that can serve, each as id@version."""


@dataclass(frozen=True)
class Models:
    base_id: str
    max_context: int
    has_chat_template: bool
    adapters: list[ServedModel]
    """The adapters this caller may use."""


class _Stream:
    """Accumulates one choice's stream messages: each message's text delta, and the last's GenerateResult."""

    def __init__(self):
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []
        self.finished = False

    def add(self, msg: pb.GenerateStreamResponse) -> str | GenerateResult:
        """What the caller is yielded for `msg`: its text, or the whole result once it carries a finish reason."""
        self.parts.append(msg.text)
        self.token_ids += msg.token_ids
        self.logprobs += _logprobs(msg.logprobs)
        self.prompt_logprobs += _logprobs(msg.prompt_logprobs)
        if not msg.finish_reason:
            return msg.text
        self.finished = True
        return GenerateResult.from_pb(msg, "".join(self.parts), self.token_ids, self.logprobs, self.prompt_logprobs)


class RequestFailed(Exception):
    """A gRPC error with the server's structured details unpacked."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", metadata: dict | None = None,
                 field_name: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.reason = code, message, reason
        self.metadata, self.field = metadata or {}, field_name

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> RequestFailed:
        reason, metadata, field_name = "", {}, ""
        status = status_pb2.Status()
        for key, value in err.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                status.ParseFromString(value)
        for detail in status.details:
            info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad) and bad.field_violations:
                field_name = bad.field_violations[0].field
        return cls(err.code(), err.details() or "", reason, metadata, field_name)


Messages = Sequence[tuple[str, str]]
"""Chat messages as (role, content): role system, user or assistant."""


def build_request(adapter: str, prompt: str = "", *, messages: Messages | None = None,
                  prompt_token_ids: Sequence[int] | None = None, max_new_tokens: int = 0,
                  min_new_tokens: int = 0, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, repetition_penalty: float | None = None,
                  presence_penalty: float | None = None, frequency_penalty: float | None = None,
                  stop: list[str] | None = None, ignore_eos: bool = False, truncate_input_tokens: int = 0,
                  logprobs: int | None = None, prompt_logprobs: int | None = None, n: int = 0,
                  json_schema: str | dict | None = None, json_object: bool = False, score_only: bool = False,
                  request_id: str = "") -> pb.GenerateRequest:
    """The prompt is one of `prompt`, `messages` and `prompt_token_ids`. `json_schema` (JSON text or
    a dict) or `json_object` set response_format."""
    req = pb.GenerateRequest(request_id=request_id, adapter_id=adapter, prompt=prompt,
                             messages=[pb.Message(role=r, content=c) for r, c in messages or ()],
                             prompt_token_ids=prompt_token_ids or (), max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, stop_sequences=stop or [], ignore_eos=ignore_eos,
                             truncate_input_tokens=truncate_input_tokens, n=n, score_only=score_only)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty), ("logprobs", logprobs),
                        ("prompt_logprobs", prompt_logprobs)):
        if value is not None:
            setattr(req, name, value)
    if json_schema is not None:
        req.response_format.json_schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    elif json_object:
        req.response_format.json_object.SetInParent()
    return req


def tokenize_request(text: str = "", messages: Messages | None = None) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(text=text, messages=[pb.Message(role=r, content=c) for r, c in messages or ()])


def tokenized(resp: pb.TokenizeResponse) -> Tokenized:
    return Tokenized(list(resp.token_ids), [(o.start, o.end) for o in resp.offsets], resp.text)


def models(resp: pb.ListModelsResponse) -> Models:
    return Models(resp.base.id, resp.base.max_context, resp.base.has_chat_template,
                  [ServedModel(a.id, a.version, list(a.aliases), list(a.versions)) for a in resp.adapters])


def _one_choice(params: dict) -> None:
    if params.get("n", 0) > 1:
        raise ValueError("stream() follows one choice; ask generate() for n > 1")


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def call_metadata(adapter: str, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """What every inference call sends besides the request: the routing key, and the bearer token if any."""
    return ((ROUTING_HEADER, adapter),) + auth_metadata(token)


def _generated(resp: pb.GenerateResponse) -> GenerateResult:
    return GenerateResult.from_pb(resp, resp.text)


class _Call(NamedTuple):
    """One unary RPC as the client makes it: the response is read by `read` once called (or awaited)."""

    method: Callable
    request: Message
    metadata: tuple[tuple[str, str], ...]
    read: Callable[[Message], object]


class _Client:
    """Everything but calling and awaiting: the channel, each RPC's request, metadata and deadline, and
    reading its answer. `_grpc` is the module whose channels the flavour uses (grpc or grpc.aio)."""

    _grpc: ModuleType

    def __init__(self, target: str = "localhost:50051", *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float | None = None, token: str | None = None,
                 options: list[tuple[str, str]] | None = None):
        self._channel = (self._grpc.secure_channel(target, credentials, options=options) if credentials
                         else self._grpc.insecure_channel(target, options=options))
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._timeout, self._token = timeout, token

    def _generate(self, adapter: str, prompt: str, params: dict) -> _Call:
        return _Call(self._stub.Generate, build_request(adapter, prompt, **params),
                     call_metadata(adapter, self._token), _generated)

    def _tokenize(self, text: str, messages: Messages | None) -> _Call:
        return _Call(self._stub.Tokenize, tokenize_request(text, messages), auth_metadata(self._token), tokenized)

    def _list_models(self) -> _Call:
        return _Call(self._stub.ListModels, pb.ListModelsRequest(), auth_metadata(self._token), models)

    def _send(self, call: _Call):
        """The response (sync) or an awaitable of it (asyncio)."""
        return call.method(call.request, timeout=self._timeout, metadata=call.metadata)

    def _open_stream(self, adapter: str, prompt: str, params: dict):
        """The GenerateStream call: iterable (sync) or async iterable (asyncio), and cancellable."""
        _one_choice(params)
        return self._stub.GenerateStream(build_request(adapter, prompt, **params), timeout=self._timeout,
                                         metadata=call_metadata(adapter, self._token))


class LoraServeClient(_Client):
    """`target` may be one address or, with `options` from clients.affinity, several replicas."""

    _grpc = grpc

    def generate(self, adapter: str, prompt: str = "", **params) -> GenerateResult:
        """`params`: build_request's keywords."""
        return self._unary(self._generate(adapter, prompt, params))

    def stream(self, adapter: str, prompt: str = "", **params) -> Iterator[str | GenerateResult]:
        """Yields text deltas, then one GenerateResult holding the whole text (and tokens). Leaving the
        loop early cancels the call."""
        call, acc = self._open_stream(adapter, prompt, params), _Stream()
        try:
            for msg in call:
                yield acc.add(msg)
                if acc.finished:
                    return
        except grpc.RpcError as err:
            raise RequestFailed.from_rpc_error(err) from None
        finally:
            call.cancel()

    def tokenize(self, text: str = "", messages: Messages | None = None) -> Tokenized:
        """The base model's token ids for `text`, or for `messages` rendered with its chat template."""
        return self._unary(self._tokenize(text, messages))

    def list_models(self) -> Models:
        """The base model and the adapters this caller may use."""
        return self._unary(self._list_models())

    def _unary(self, call: _Call):
        try:
            resp = self._send(call)
        except grpc.RpcError as err:
            raise RequestFailed.from_rpc_error(err) from None
        return call.read(resp)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoraServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncLoraServeClient(_Client):
    """LoraServeClient's methods, awaited; stream() is an async iterator."""

    _grpc = grpc.aio

    async def generate(self, adapter: str, prompt: str = "", **params) -> GenerateResult:
        return await self._unary(self._generate(adapter, prompt, params))

    async def stream(self, adapter: str, prompt: str = "", **params) -> AsyncIterator[str | GenerateResult]:
        call, acc = self._open_stream(adapter, prompt, params), _Stream()
        try:
            async for msg in call:
                yield acc.add(msg)
                if acc.finished:
                    return
        except grpc.RpcError as err:
            raise RequestFailed.from_rpc_error(err) from None
        finally:
            call.cancel()

    async def tokenize(self, text: str = "", messages: Messages | None = None) -> Tokenized:
        return await self._unary(self._tokenize(text, messages))

    async def list_models(self) -> Models:
        return await self._unary(self._list_models())

    async def _unary(self, call: _Call):
        try:
            resp = await self._send(call)
        except grpc.RpcError as err:
            raise RequestFailed.from_rpc_error(err) from None
        return call.read(resp)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLoraServeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
