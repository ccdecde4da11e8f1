"""Cross-row isolation measured on scores, through the real engine: each request is fed a fixed
token sequence (teacher forcing) alone and inside a mixed batch (three adapters and the base,
prompts of different lengths), and the scores it gets at every position are compared.

Batching changes the shapes a row's sums are computed in (rows per matmul, rows sharing its adapter,
padded prompt width, attended length, bitsandbytes' kernel per row count), so by default scores
agree within a stated tolerance, not bit for bit, in every dtype; greedy text can then differ
after a near-tie. With `deterministic` every row runs alone and its scores are the same bits in
any batch, beside any other adapter."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from conftest import ADAPTERS, demo_ref
from forced import Forced, LogitsEngine, forced_scores
from loraserve.runner.demo import DOMAINS
from loraserve.runner.config import EngineConfig
from loraserve.scheduler.types import AdapterRef

PROMPTS = ("Question: What should I do next?\nAnswer:", "Question: Is this normal?\nAnswer:", "Hello there",
           "Question: Why did this happen?\nAnswer:", "Question: Tell me more.\nAnswer:")
TOLERANCE = {  # (dtype, quantization): largest score difference allowed, as a share of the largest |score|
    ("float32", "none"): 1e-5,
    ("float32", "nf4"): 2**-7,
    ("bfloat16", "none"): 2**-5,
    ("bfloat16", "nf4"): 2**-5,
}
CASES = [pytest.param(*key, mode, id=f"{key[0]}-{key[1]}-{mode}") for key in TOLERANCE for mode in ("off", "buffers")]


def mixed_requests(engine, refs: list[AdapterRef], tokens: int = 16) -> list[Forced]:
    """One request per ref, each fed a sentence of another domain than its own now and then."""
    domains = [*DOMAINS]
    out = []
    for i, ref in enumerate(refs):
        parts = DOMAINS[domains[i % len(domains)]]
        text = " " + " ".join(parts[k][i % len(parts[k])] for k in ("subject", "verb", "rest"))
        out.append(Forced(ref, tuple(engine.encode(PROMPTS[i % len(PROMPTS)])),
                          tuple(engine.encode(text)[1:tokens + 1])))  # [1:]: no BOS mid-sequence
    return out


def start(demo_dir, **cfg) -> LogitsEngine:
    engine = LogitsEngine(EngineConfig(demo_dir / "base", max_rows=8, max_model_len=160, **cfg))
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def wide(demo_dir, tmp_path_factory) -> AdapterRef:
    """A rank-32 adapter for the demo base (the demo's are rank 8): attached, it makes the stacks'
    widest adapter, which each row's LoRA must not read past its own rank for."""
    from loraserve.tools.bench.synth import make_store

    store = make_store(demo_dir / "base", tmp_path_factory.mktemp("wide"), 1, rank=32)
    path = store.version_dir("bench0", "1")
    return AdapterRef("bench0", "1", str(path), json.loads((path / "metadata.json").read_text())["weights_sha256"])


@pytest.mark.parametrize("dtype, quantization, mode", CASES)
def test_a_rows_scores_in_a_mixed_batch_agree_with_alone_within_the_stated_tolerance(demo_dir, dtype, quantization,
                                                                                     mode, record_property):
    engine = start(demo_dir, device="cpu", dtype=dtype, quantization=quantization, decode_graphs=mode)
    try:
        refs = [demo_ref(demo_dir, n) for n in (*ADAPTERS, "base", "medical", "legal")]
        requests = mixed_requests(engine, refs)
        alone = [forced_scores(engine, [r])[0] for r in requests]
        together = forced_scores(engine, requests)
        other = forced_scores(engine, [Forced(refs[1], requests[0].prompt, requests[0].tokens)])[0]
    finally:
        asyncio.run(engine.close())
    scale = max(float(a.abs().max()) for a in alone)
    worst = max(float((a - t).abs().max()) for a, t in zip(alone, together, strict=True))
    moved = float((alone[0] - other).abs().max())
    # docs/architecture.md "What batching guarantees" quotes these.
    record_property("worst_share", f"{worst / scale:.2g}")
    record_property("other_adapter_share", f"{moved / scale:.2g}")
    assert worst <= TOLERANCE[dtype, quantization] * scale, (worst, scale)
    # The tolerance is far below what an adapter changes: another adapter on the same tokens.
    assert moved > 20 * TOLERANCE[dtype, quantization] * scale


@pytest.mark.parametrize("dtype, quantization, mode", CASES)
def test_deterministic_rows_score_the_same_bits_in_any_batch_beside_any_adapter(demo_dir, wide, dtype,
                                                                                 quantization, mode):
    before = torch.are_deterministic_algorithms_enabled()  # a --deterministic server of the session may hold it
    engine = start(demo_dir, device="cpu", dtype=dtype, quantization=quantization, decode_graphs=mode,
                   deterministic=True)
    try:
        requests = mixed_requests(engine, [demo_ref(demo_dir, n) for n in (*ADAPTERS, "base", "medical", "legal")])
        alone = [forced_scores(engine, [r])[0] for r in requests]
        # Now beside a rank-32 adapter too (attached for this batch): the rank-8 rows read their own rank.
        together = forced_scores(engine, [*requests, *mixed_requests(engine, [wide])])
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        asyncio.run(engine.close())
    assert torch.are_deterministic_algorithms_enabled() == before  # the process's setting is back
    assert all(torch.equal(a, t) for a, t in zip(alone, together[:len(alone)]))


def test_torchs_deterministic_switch_stays_on_until_the_last_deterministic_engine_closes(demo_dir):
    before = torch.are_deterministic_algorithms_enabled()
    first, second = (start(demo_dir, device="cpu", deterministic=True) for _ in range(2))
    asyncio.run(first.close())
    assert torch.are_deterministic_algorithms_enabled()  # the second still serves
    asyncio.run(second.close())
    assert torch.are_deterministic_algorithms_enabled() == before
