"""Typed clients over the generated stubs.

    with LoraServeClient("localhost:50051") as c:
        print(c.generate("legal", "Question: What now?\\nAnswer:").text)

Every call carries the adapter id as `x-adapter-id` metadata, so a proxy or the channel's
ring_hash policy can keep each adapter on one replica (clients/affinity.py). Failures raise
RequestFailed with the gRPC code and the server's ErrorInfo reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import grpc
from google.rpc import error_details_pb2, status_pb2

from loraserve.contract import ROUTING_HEADER
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc


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

    @classmethod
    def from_pb(cls, msg: pb.GenerateResponse | pb.GenerateStreamResponse, text: str) -> GenerateResult:
        return cls(
            request_id=msg.request_id, text=text,
            finish_reason=pb.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower(),
            input_tokens=msg.usage.input_tokens, output_tokens=msg.usage.output_tokens,
            adapter_id=msg.adapter.id, adapter_version=msg.adapter.version,
            load_source=pb.LoadSource.Name(msg.adapter.load_source).removeprefix("LOAD_SOURCE_").lower(),
            timings_ms={"queue": msg.timings.queue_ms, "load": msg.timings.load_ms,
                        "prefill": msg.timings.prefill_ms, "decode": msg.timings.decode_ms},
            cost_ms={"prefill_device": msg.usage.prefill_device_ms, "decode_device": msg.usage.decode_device_ms,
                     "adapter_load": msg.usage.adapter_load_ms},
            cached_input_tokens=msg.usage.cached_input_tokens,
        )


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


def build_request(adapter: str, prompt: str, *, max_new_tokens: int = 0, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  stop: list[str] | None = None, ignore_eos: bool = False,
                  request_id: str = "") -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, adapter_id=adapter, prompt=prompt,
                             max_new_tokens=max_new_tokens, stop_sequences=stop or [], ignore_eos=ignore_eos)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(req, name, value)
    return req


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def call_metadata(adapter: str, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """What every inference call sends besides the request: the routing key, and the bearer token if any."""
    return ((ROUTING_HEADER, adapter),) + auth_metadata(token)


class LoraServeClient:
    """`target` may be one address or, with `options` from clients.affinity, several replicas."""

    def __init__(self, target: str = "localhost:50051", *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float | None = None, token: str | None = None,
                 options: list[tuple[str, str]] | None = None):
        self._channel = (grpc.secure_channel(target, credentials, options=options) if credentials
                         else grpc.insecure_channel(target, options=options))
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._timeout, self._token = timeout, token

    def generate(self, adapter: str, prompt: str, **params) -> GenerateResult:
        try:
            resp = self._stub.Generate(build_request(adapter, prompt, **params), timeout=self._timeout,
                                       metadata=call_metadata(adapter, self._token))
        except grpc.RpcError as err:
            raise RequestFailed.from_rpc_error(err) from None
        return GenerateResult.from_pb(resp, resp.text)

    def stream(self, adapter: str, prompt: str, **params) -> Iterator[str | GenerateResult]:
        """Yields text deltas, then one GenerateResult holding the whole text."""
        parts: list[str] = []
        try:
            for msg in self._stub.GenerateStream(build_request(adapter, prompt, **params), timeout=self._timeout,
                                                 metadata=call_metadata(adapter, self._token)):
                if msg.finish_reason:
                    yield GenerateResult.from_pb(msg, "".join(parts) + msg.text)
                    return
                parts.append(msg.text)
                yield msg.text
        except grpc.RpcError as err:
            raise RequestFailed.from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoraServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncLoraServeClient:
    def __init__(self, target: str = "localhost:50051", *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float | None = None, token: str | None = None,
                 options: list[tuple[str, str]] | None = None):
        self._channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials
                         else grpc.aio.insecure_channel(target, options=options))
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._timeout, self._token = timeout, token

    async def generate(self, adapter: str, prompt: str, **params) -> GenerateResult:
        try:
            resp = await self._stub.Generate(build_request(adapter, prompt, **params), timeout=self._timeout,
                                             metadata=call_metadata(adapter, self._token))
        except grpc.aio.AioRpcError as err:
            raise RequestFailed.from_rpc_error(err) from None
        return GenerateResult.from_pb(resp, resp.text)

    async def stream(self, adapter: str, prompt: str, **params) -> AsyncIterator[str | GenerateResult]:
        parts: list[str] = []
        try:
            async for msg in self._stub.GenerateStream(build_request(adapter, prompt, **params),
                                                       timeout=self._timeout,
                                                       metadata=call_metadata(adapter, self._token)):
                if msg.finish_reason:
                    yield GenerateResult.from_pb(msg, "".join(parts) + msg.text)
                    return
                parts.append(msg.text)
                yield msg.text
        except grpc.aio.AioRpcError as err:
            raise RequestFailed.from_rpc_error(err) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLoraServeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
