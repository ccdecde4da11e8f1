"""Runs an evaluation gate's cases (registry.evaluate) through the serving path: gRPC Generate,
against a running server (`--target HOST:PORT`) or a real server started in this process on the
store and the base model (a free loopback port, no metrics listener), so the answers come from the
very validation, resolution, scheduler and engine code that serves traffic.

Each side is asked one case at a time (latency is then the request's own, not a batch's, and its
adapter is loaded by a first request outside the figures), greedy
unless the case samples, with fallback FAIL so a side that cannot serve is an error, never the
base model answering in its name.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import grpc

from loraserve.v1 import inference_pb2, inference_pb2_grpc
from loraserve.registry.evaluate import Answer, Case

TIMEOUT_S = 120.0
"""Per request: a cold adapter load on a large model included."""


def request(case: Case, adapter_id: str, request_id: str) -> inference_pb2.GenerateRequest:
    s = case.sampling
    req = inference_pb2.GenerateRequest(
        request_id=request_id, adapter_id=adapter_id, max_new_tokens=case.max_new_tokens,
        stop_sequences=s.get("stop_sequences", []), fallback=inference_pb2.FALLBACK_FAIL)
    if case.messages:
        req.messages.extend(inference_pb2.Message(role=r, content=c) for r, c in case.messages)
    else:
        req.prompt = case.prompt
    for k in ("temperature", "top_p", "top_k", "seed"):
        if k in s:
            setattr(req, k, s[k])
    return req


async def answers(target: str, sides: dict[str, str], cases: list[Case]) -> dict[str, list[Answer]]:
    """side -> one Answer per case, from the server at `target` (sides: side -> adapter id)."""
    out: dict[str, list[Answer]] = {s: [] for s in sides}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for side, adapter_id in sides.items():  # loads each adapter before the clock runs
            warm = inference_pb2.GenerateRequest(request_id=f"evaluate-warm-{side}", adapter_id=adapter_id,
                                                 prompt=cases[0].prompt or "warm", max_new_tokens=1)
            try:
                await stub.Generate(warm, timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError:
                pass  # the cases will say why
        for i, case in enumerate(cases):
            for side, adapter_id in sides.items():
                started = time.perf_counter()
                try:
                    r = await stub.Generate(request(case, adapter_id, f"evaluate-{i}-{side}"), timeout=TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    out[side].append(Answer(latency_ms=(time.perf_counter() - started) * 1e3,
                                            error=f"{exc.code().name}: {exc.details()}"))
                    continue
                out[side].append(Answer(r.text, r.usage.output_tokens, (time.perf_counter() - started) * 1e3))
    return out


async def in_process(model_path: Path, store: str, s3_endpoint_url: str | None, sides: dict[str, str],
                     cases: list[Case]) -> dict[str, list[Answer]]:
    """`answers` from a server started here on `store` and the base model, stopped after."""
    from loraserve.server.app import LoraServer  # torch: only when the cases run here
    from loraserve.server.settings import load

    with tempfile.TemporaryDirectory(prefix="loraserve-evaluate-") as cache:
        cfg = load(dict(port=0, metrics_port=-1, http_port=0, model_path=Path(model_path), adapters_dir=str(store),
                        s3_endpoint_url=s3_endpoint_url or "", disk_cache_dir=Path(cache)), env={})
        server = LoraServer(cfg)
        await server.start()
        try:
            await server.load()
            return await answers(f"127.0.0.1:{server.port}", sides, cases)
        finally:
            await server.stop()
