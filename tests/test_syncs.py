"""One device-to-host transfer per step (decode, or decode with a prefill in the same forward): the
step's tokens and finite flags (and the logprobs rows ask for, packed with them), through
runner.steps._fetch, and no other read of a device value on the host.

On a CPU no transfer is observable, so the CPU test counts what would be one on cuda: calls of
`_fetch`, and every Python-level read of a tensor's values (`.tolist()`, `.item()`, `.cpu()`,
`.numpy()`, `bool()`, `int()`, `float()`, use as an index) anywhere in the step outside the model's
own forward. On cuda each of those is a synchronisation when the tensor lives on the device
(torch.cuda.set_sync_debug_mode flags it); on a CPU they are all counted, host tensors too, so the
step reads none at all. (A copy *to* the host with `.to("cpu")` is not counted: on a CPU it cannot
be told from the copies in; the gpu test below catches it.) The model's forward is left out: it is
the same forward a CUDA graph captures, which could not hold a sync.

The `gpu` test runs the same step on cuda under set_sync_debug_mode("error"), which raises on any
synchronising call (a pageable copy in, a read of a device value) except inside `_fetch`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest
import torch

import loraserve.runner.steps as steps_module
from conftest import ADAPTERS, PROMPT, demo_ref
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import SamplingParams

PROMPTS = (PROMPT, "Question: Is this normal?\nAnswer:", "Hello there", "Question: Why?\nAnswer:")
SAMPLING = (SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=1),
            SamplingParams(temperature=0.9, top_p=0.9, seed=2), SamplingParams(temperature=0.7, top_k=40, top_p=0.8, seed=3),
            SamplingParams(temperature=1.2, seed=4), SamplingParams(), SamplingParams(temperature=0.5, top_k=3, seed=5))
READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _engine(demo_dir, mode: str, device: str = "cpu") -> TorchEngine:
    # FlexAttention's cuda kernel needs blocks of at least 16 (runner/loading.attention_kernel).
    engine = TorchEngine(EngineConfig(demo_dir / "base", device=device, max_rows=8, max_model_len=160,
                                      kv_block_size=16 if device == "cuda" else 8, decode_graphs=mode))
    asyncio.run(engine.start())
    return engine


def _mixed_batch(engine: TorchEngine, demo_dir, sampling=SAMPLING, joining: bool = False, asking: bool = False):
    """A prefilled batch of greedy and sampled rows (top_k, top_p, both, temperature alone) over the
    base model and three adapters; -> a function running its next decode step (`joining`: with a
    newcomer's prompt prefilled in the same step, one forward, as the scheduler mixes them;
    `asking`: every other row asks for logprobs, penalties or min_new_tokens, the newcomer for
    prompt logprobs)."""
    if asking:
        sampling = [replace(p, repetition_penalty=1.2, presence_penalty=0.5) if i % 3 == 1 else p
                    for i, p in enumerate(sampling)]
    extra = [dict(logprobs=i % 4, min_new_tokens=4) if asking and i % 2 == 0 else {} for i in range(len(sampling))]
    refs = [demo_ref(demo_dir, n) for n in ("base", *ADAPTERS)]
    manager = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
    prompts = [tuple(engine.encode(PROMPTS[i % len(PROMPTS)])) for i in range(len(sampling))]
    tables = [manager.admit("s", p) for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]

    def rows() -> list[Row]:
        for i, p in enumerate(prompts):
            assert manager.grow(tables[i], len(p) + len(generated[i]))
        return [Row(i, refs[i % len(refs)], tuple(tables[i].blocks), prompts[i], generated[i], sampling[i], **extra[i])
                for i in range(len(prompts))]

    async def prefill():
        for ref in refs[1:]:
            if ref not in engine._adapters.attached:
                await engine.fetch(ref)
                await engine.attach(ref)
        for r in await engine.prefill(rows()):
            generated[r.seq_id].append(r.token_id)
    asyncio.run(prefill())

    newcomer = tuple(engine.encode(PROMPTS[1]))
    table = manager.admit("n", newcomer)
    joiner = Row(len(prompts), refs[1], tuple(table.blocks), newcomer, [], sampling[1], upto=len(newcomer),
                 prefill=True, prompt_logprobs=2 if asking else None)

    def step() -> list:
        results = engine._step([*rows(), joiner] if joining else rows())
        for r in results:
            assert r.error is None
            if r.seq_id < len(prompts):
                generated[r.seq_id].append(r.token_id)
        return results
    return step


def counting_reads(monkeypatch, engine) -> tuple[list[str], list[tuple[int, ...]]]:
    """From now on: every read of a tensor's values on the host outside the model's forward and
    the step's one transfer, and the shape of each transfer (`_fetch`)."""
    reads, fetched, inside = [], [], [0]

    def bracketed(real, record=False):
        def run(*args, **kwargs):
            if record:
                fetched.append(tuple(args[0].shape))
            inside[0] += 1  # what _fetch itself reads is the one transfer
            try:
                return real(*args, **kwargs)
            finally:
                inside[0] -= 1
        return run

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if not inside[0]:
                reads.append(name)
            return real(self, *args, **kwargs)
        return read

    monkeypatch.setattr(steps_module, "_fetch", bracketed(steps_module._fetch, record=True))
    monkeypatch.setattr(engine, "_call", bracketed(engine._call))
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    return reads, fetched


@pytest.mark.parametrize("mode,joining,asking", [("off", False, False), ("buffers", False, False),
                                                ("off", True, False), ("off", True, True), ("buffers", False, True)],
                         ids=["decode", "decode-buffers", "decode-and-prefill", "with-logprobs-and-penalties",
                              "decode-buffers-with-logprobs"])
def test_a_step_reads_the_device_once(demo_dir, monkeypatch, mode, joining, asking):
    engine = _engine(demo_dir, mode)
    try:
        step = _mixed_batch(engine, demo_dir, joining=joining, asking=asking)
        step()  # a first step (the buffers' bucket) as a warm-up, then one counted
        reads, fetched = counting_reads(monkeypatch, engine)
        results = step()
        monkeypatch.undo()
        # Asked-for logprobs come packed flat after the tokens and flags, in the same transfer.
        assert len(fetched) == 1 and (fetched[0] == (2, len(SAMPLING) + joining)) != asking
        assert reads == []
        assert len(results) == len(SAMPLING) + joining
        if asking:
            assert all((r.logprob is not None) == (i % 2 == 0) for i, r in enumerate(results[:len(SAMPLING)]))
            assert (len(results[-1].prompt_logprobs) > 0) == joining
    finally:
        asyncio.run(engine.close())


@contextlib.contextmanager
def syncs_only_in_fetch(monkeypatch):
    """Inside: any implicit cuda synchronisation raises, except within the step's one transfer
    (runner/steps.py _fetch); yields the devices of the tensors that transfer read."""
    real_fetch, fetched = steps_module._fetch, []

    def fetch(tensor):
        fetched.append(tensor.device.type)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_fetch(tensor)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(steps_module, "_fetch", fetch)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield fetched
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("mode,joining,asking", [("auto", False, False), ("off", False, False), ("auto", True, False),
                                                ("auto", True, True), ("auto", False, True)])
def test_a_cuda_step_synchronises_only_in_its_fetch(demo_dir, monkeypatch, mode, joining, asking):
    """Captured ("auto") and eager decode on cuda, and a decode step with a prefill in its forward:
    no implicit sync anywhere in the step (pageable copies in, reads of device values) but the one
    transfer."""
    engine = _engine(demo_dir, mode, device="cuda")
    try:
        step = _mixed_batch(engine, demo_dir, joining=joining, asking=asking)
        step()  # captures the bucket's graph, compiles FlexAttention: both synchronise, once
        torch.cuda.synchronize()
        with syncs_only_in_fetch(monkeypatch) as fetched:
            step()
        assert fetched == ["cuda"]
    finally:
        asyncio.run(engine.close())


def test_the_finite_flag_is_isfinite_all():
    from loraserve.runner.steps import _finite

    scores = torch.randn(6, 50) * 1e37  # large finite scores: their sum would overflow, not 0 x them
    for row, bad in ((1, float("nan")), (2, float("inf")), (3, float("-inf")), (4, 3.4e38)):
        scores[row, 7 * row] = bad
    assert _finite(scores).tolist() == torch.isfinite(scores).all(dim=-1).tolist() == [True, False, False, False,
                                                                                       True, True]


def test_the_step_host_bench_runs(demo_dir):
    from loraserve.tools.bench.step_host import MIXES, step_host

    rows = step_host(demo_dir / "base", batches=(3,), vocab=1000, steps=2)
    assert [(r["batch"], r["mix"]) for r in rows] == [(3, mix) for mix in MIXES]
    assert all(r["median_us"] > 0 for r in rows)
