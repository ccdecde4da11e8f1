"""Both client flavours against a fake servicer in this process: the same metadata, deadline, answers
and error mapping, and a stream the caller leaves early is cancelled on the server."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from loraserve.clients.client import AsyncLoraServeClient, LoraServeClient, RequestFailed
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc


class FakeService(inference_pb2_grpc.InferenceServiceServicer):
    """Generate echoes what it saw; adapter "refused" fails with an ErrorInfo; GenerateStream sends
    deltas until it finishes or the caller goes away (then `cancelled` is set)."""

    def __init__(self):
        self.seen: list[tuple[dict, float | None]] = []
        self.cancelled = threading.Event()

    def _see(self, context) -> None:
        self.seen.append((dict(context.invocation_metadata()), context.time_remaining()))

    def Generate(self, request, context):
        self._see(context)
        if request.adapter_id == "refused":
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason="ADAPTER_UNKNOWN", metadata={"adapter": "refused"}))
            status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="no such adapter",
                                       details=[info])
            context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
            context.abort(grpc.StatusCode.NOT_FOUND, "no such adapter")
        return pb.GenerateResponse(request_id="r1", text=request.prompt.upper(), token_ids=[1, 2],
                                   finish_reason=pb.FINISH_REASON_LENGTH)

    def GenerateStream(self, request, context):
        self._see(context)
        context.add_callback(lambda: None if context.is_active() else self.cancelled.set())
        for i in range(request.max_new_tokens or 10_000):
            if self.cancelled.wait(0.01):
                return
            yield pb.GenerateStreamResponse(text=f"t{i} ", token_ids=[i])
        yield pb.GenerateStreamResponse(request_id="r2", finish_reason=pb.FINISH_REASON_EOS)

    def Tokenize(self, request, context):
        self._see(context)
        return pb.TokenizeResponse(token_ids=[7], offsets=[pb.Offset(start=0, end=len(request.text))],
                                   text=request.text)

    def ListModels(self, request, context):
        self._see(context)
        return pb.ListModelsResponse(base=pb.BaseModel(id="base", max_context=64),
                                     adapters=[pb.ServedModel(id="legal", version="1", aliases=["law"])])


@pytest.fixture
def service():
    fake = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


class Sync:
    """The sync client behind the async client's shape, so one test body checks both."""

    def __init__(self, target, **kw):
        self.client = LoraServeClient(target, **kw)

    async def generate(self, *a, **kw):
        return self.client.generate(*a, **kw)

    async def tokenize(self, *a, **kw):
        return self.client.tokenize(*a, **kw)

    async def list_models(self):
        return self.client.list_models()

    async def stream(self, *a, **kw):
        for item in self.client.stream(*a, **kw):
            yield item

    async def close(self):
        self.client.close()


FLAVOURS = {"sync": Sync, "asyncio": AsyncLoraServeClient}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_both_flavours_send_and_read_the_same(service, flavour):
    fake, target = service

    async def calls():
        client = FLAVOURS[flavour](target, timeout=30, token="t0k")
        try:
            result = await client.generate("legal", "hi there", max_new_tokens=3)
            assert (result.text, result.token_ids, result.finish_reason) == ("HI THERE", [1, 2], "length")
            tokens = await client.tokenize("abc")
            assert (tokens.token_ids, tokens.offsets, tokens.text) == ([7], [(0, 3)], "abc")
            listed = await client.list_models()
            assert (listed.base_id, [(a.id, a.aliases) for a in listed.adapters]) == ("base", [("legal", ["law"])])
            items = [item async for item in client.stream("legal", "go", max_new_tokens=2)]
            assert items[:2] == ["t0 ", "t1 "] and items[2].text == "t0 t1 " and items[2].token_ids == [0, 1]
            with pytest.raises(RequestFailed) as failed:
                await client.generate("refused", "x")
            assert (failed.value.code, failed.value.reason, failed.value.metadata) == (
                grpc.StatusCode.NOT_FOUND, "ADAPTER_UNKNOWN", {"adapter": "refused"})
            with pytest.raises(ValueError):
                await anext(client.stream("legal", "x", n=2))
        finally:
            await client.close()

    asyncio.run(calls())
    routed = [md.get("x-adapter-id") for md, _ in fake.seen]
    assert routed == ["legal", None, None, "legal", "refused"]
    assert all(md["authorization"] == "Bearer t0k" for md, _ in fake.seen)
    assert all(20 < remaining < 31 for _, remaining in fake.seen)  # gRPC rounds deadlines up


def test_leaving_a_sync_stream_early_cancels_the_call(service):
    fake, target = service
    with LoraServeClient(target, timeout=30) as client:
        for item in client.stream("legal", "go"):
            assert item == "t0 "
            break
        assert fake.cancelled.wait(5)


def test_leaving_an_async_stream_early_cancels_the_call(service):
    fake, target = service

    async def leave():
        async with AsyncLoraServeClient(target, timeout=30) as client:
            deltas = client.stream("legal", "go")
            assert await anext(deltas) == "t0 "
            await deltas.aclose()
            assert await asyncio.to_thread(fake.cancelled.wait, 5)

    asyncio.run(leave())


def test_a_deadline_maps_to_request_failed(service):
    _, target = service
    with LoraServeClient(target, timeout=0.2) as client, pytest.raises(RequestFailed) as failed:
        list(client.stream("legal", "go"))
    assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
