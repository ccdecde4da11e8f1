"""A step is a transaction: whatever raises at any stage of a prefill or a decode, through the
real engine, fails only the request whose data caused it. Every other row of that step goes
on and answers exactly what it answers alone."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from conftest import ADAPTERS, PROMPT, ServerThread, comparable, server_config
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.runner.engine import TorchEngine
from loraserve.server.app import engine_config
from test_generate import details

POISON = "Question: Why is this request poisoned?\nAnswer:"
STAGES = ("inputs", "forward", "sample", "detokenize", "nonfinite", "oom")


class FaultyEngine(TorchEngine):
    """The real engine, failing at `stage` of every `phase` step that carries the poisoned
    prompt (in decode, from its third token on, when it has run beside the others a while)."""

    stage: str | None = None
    phase = "prefill"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.poison: tuple[int, ...] = ()
        self.poisoned: set[int] = set()  # sequences seen with the poisoned prompt
        self.hits = 0
        self._lock = threading.Lock()

    def _armed(self, rows, stage: str) -> bool:
        hit = self.stage == stage and any(
            r.prompt_ids == self.poison and (self.phase == "prefill") == (not r.generated)
            and (self.phase == "prefill" or len(r.generated) >= 3) for r in rows)
        if hit:
            with self._lock:
                self.hits += 1
        return hit

    def _step(self, rows):  # prefill, decode or both in one forward
        self.poisoned |= {r.seq_id for r in rows if r.prompt_ids == self.poison}
        if self._armed(rows, "inputs"):
            raise ValueError("cannot build this step's inputs")
        return super()._step(rows)

    def _forward(self, rows, ids, positions, ctx, *slots):
        if self._armed(rows, "oom"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self._armed(rows, "forward"):
            # Fail in the last layer, after the earlier layers have written this step's KV.
            def explode(*_):
                raise RuntimeError("kernel failed in the last layer")
            hook = self._model.model.layers[-1].register_forward_pre_hook(explode)
            try:
                return super()._forward(rows, ids, positions, ctx, *slots)
            finally:
                hook.remove()
        logits = super()._forward(rows, ids, positions, ctx, *slots)
        if self._armed(rows, "nonfinite"):
            logits[[i for i, r in enumerate(rows) if r.prompt_ids == self.poison]] = float("nan")
        return logits

    def _sample(self, rows, logits):
        if self._armed(rows, "sample"):
            raise RuntimeError("probability tensor contains inf, nan or element < 0")
        return super()._sample(rows, logits)

    def _detokenize(self, job):
        # The text of a poisoned row's token: its first in "prefill", its fourth on in "decode".
        first = job.position == 0
        if (self.stage == "detokenize" and job.seq_id in self.poisoned and (self.phase == "prefill") == first
                and (first or job.position >= 3)):
            with self._lock:
                self.hits += 1
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return super()._detokenize(job)


@pytest.fixture(scope="module")
def faulty(demo_dir):
    # Arrivals gather for 100 ms, so the poisoned request and its victims share every step.
    cfg = comparable(server_config(demo_dir, batch_wait_ms=100.0, join_delay_ms=100.0))
    srv = ServerThread(cfg, engine=FaultyEngine(engine_config(cfg)))
    srv.server.engine.poison = tuple(srv.server.engine.encode(POISON))
    with srv.channel() as channel:
        yield srv, inference_pb2_grpc.InferenceServiceStub(channel)
    srv.stop()


def _request(adapter, prompt=PROMPT, **kw):
    return pb.GenerateRequest(adapter_id=adapter, prompt=prompt, max_new_tokens=16, ignore_eos=True, **kw)


VICTIMS = [_request(a, f"{PROMPT} {i}") for i, a in enumerate((*ADAPTERS, "base"))] + \
    [_request("legal", PROMPT, temperature=0.8, top_p=0.9, seed=7)]


@pytest.fixture(scope="module")
def alone(server):
    with server.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        return [stub.Generate(r, timeout=60).text for r in VICTIMS]


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_at_any_stage_fails_only_its_own_request(faulty, alone, phase, stage):
    srv, stub = faulty
    engine = srv.server.engine
    engine.stage, engine.phase, engine.hits = stage, phase, 0
    try:
        poisoned = stub.Generate.future(_request("medical", POISON), timeout=60)
        victims = [stub.Generate.future(r, timeout=60) for r in VICTIMS]
        assert [f.result().text for f in victims] == alone
        with pytest.raises(grpc.RpcError) as failed:
            poisoned.result()
    finally:
        engine.stage = None
    assert engine.hits >= 1
    want = {"oom": (grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY"),
            "nonfinite": (grpc.StatusCode.INTERNAL, "NON_FINITE_LOGITS")}.get(
        stage, (grpc.StatusCode.INTERNAL, "GENERATION_FAILED"))
    assert (failed.value.code(), details(failed.value)[0].reason) == want
    # Nothing lingers: the same requests, all healthy now, answer as they do alone.
    assert [f.result().text for f in [stub.Generate.future(r, timeout=60) for r in VICTIMS]] == alone


def test_a_sampling_value_that_overflows_cannot_touch_a_running_neighbour(server, stub, alone):
    """The first bug report: temperature 1e-38 on a newcomer made a running `legal` stream
    continue in the newcomer's adapter."""
    long = pb.GenerateRequest(adapter_id="legal", prompt=PROMPT, max_new_tokens=120, ignore_eos=True)
    reference = stub.Generate(long, timeout=60).text
    stream = stub.GenerateStream(long, timeout=60)
    first = next(stream)
    for adapter in ("base", "medical"):
        tiny = stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt="Hello", max_new_tokens=4,
                                                temperature=1e-38), timeout=60)
        assert tiny.usage.output_tokens == 4
    text = first.text + "".join(m.text for m in stream)
    assert text == reference
