"""Host work of one decode step, the model's forward excluded.

The real engine's `_decode` (building the step's inputs, sampling, the transfer back) runs on a
batch of rows whose forward is replaced, and only it, by a stand-in returning fixed logits: what
is timed is everything a step does around the model. Detokenising the step's tokens, which runs on
its own thread while the next step runs (Engine.detokenize), is timed apart. On a CPU "host work" is all of
it, the copies and the sampling kernels included; on cuda the same code would only launch them.

The logits are random, with the tokenizer's own ids raised above the rest so the sampled tokens
stay printable (the vocabulary can be larger than the demo tokenizer's). Rows are base-model rows
(no adapter), each `generated` long, decoding the same step over and over (their KV blocks are
never written: the forward that would write them is the stand-in).

    python -m loraserve.tools.bench.step_host [--batches 32,128] [--vocab 32000] [--steps 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from loraserve.scheduler.blocks import BlockManager
from loraserve.scheduler.engine import Row, TextJob
from loraserve.scheduler.types import BASE, SamplingParams

MIXES = {
    "greedy": [SamplingParams()],
    # A quarter each: greedy, top_k alone, top_p alone, temperature alone (a top_p row: the sort runs).
    "mixed": [SamplingParams(), SamplingParams(temperature=0.8, top_k=50, seed=1),
              SamplingParams(temperature=0.9, top_p=0.9, seed=2), SamplingParams(temperature=1.0, seed=3)],
    # Every row sampled with top_k, no top_p.
    "top_k": [SamplingParams(temperature=0.8, top_k=50, seed=1)],
    # Every row penalised (runner/sampling.py Processor), half of them greedy.
    "penalised": [SamplingParams(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1),
                  SamplingParams(temperature=0.8, top_k=50, seed=1, repetition_penalty=1.2)],
}


def step_host(model_path: Path, batches: tuple[int, ...] = (32, 128), vocab: int = 32000, steps: int = 200,
              mixes: tuple[str, ...] = tuple(MIXES), generated: int = 16) -> list[dict]:
    from loraserve.runner.config import EngineConfig
    from loraserve.runner.engine import TorchEngine

    engine = TorchEngine(EngineConfig(Path(model_path), max_rows=max(batches), max_model_len=256,
                                      kv_cache_mib=64, decode_graphs="off"))
    asyncio.run(engine.start())
    try:
        known = len(engine._tokenizer)
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(max(batches), vocab, generator=gen)
        logits[:, :min(known, vocab)] += 12.0  # sampled ids stay among the tokenizer's own

        def forward(ids, positions, ctx, keep=None):  # the stand-in for the model, and nothing else
            return logits[:ids.shape[0]]

        engine._call = forward
        prompt = tuple(engine.encode("Question: What should I do next?\nAnswer:"))
        tail = list(engine.encode(" the notice period under the contract and the terms that apply"))[1:]
        out = []
        for batch in batches:
            for mix in mixes:
                sampling = MIXES[mix]
                blocks = BlockManager(engine.kv_blocks, engine.kv_block_size, prefix_caching=False)
                rows = []
                for i in range(batch):
                    table = blocks.admit(f"r{i}", prompt)
                    done = [tail[j % len(tail)] for j in range(generated)]
                    assert table is not None and blocks.grow(table, len(prompt) + generated)
                    rows.append(Row(i, BASE, tuple(table.blocks), prompt, done, sampling[i % len(sampling)]))
                for _ in range(10):  # warm-up
                    engine._decode(rows)
                times, texts = [], []
                for _ in range(steps):
                    started = time.perf_counter()
                    results = engine._decode(rows)
                    times.append(time.perf_counter() - started)
                    # Each row's text context: its last two tokens, then the new one.
                    jobs = [TextJob(r.seq_id, (*row.generated[-2:], r.token_id), 2, generated)
                            for row, r in zip(rows, results)]
                    started = time.perf_counter()
                    engine._texts(jobs)
                    texts.append(time.perf_counter() - started)
                out.append({"batch": batch, "mix": mix, "vocab": vocab, "steps": steps,
                            "median_us": round(statistics.median(times) * 1e6),
                            "p90_us": round(sorted(times)[int(0.9 * len(times))] * 1e6),
                            "median_us_per_row": round(statistics.median(times) * 1e6 / batch, 1),
                            "detokenize_median_us": round(statistics.median(texts) * 1e6)})
        return out
    finally:
        asyncio.run(engine.close())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, help="a base model directory [the bench model, built under var/bench]")
    p.add_argument("--batches", default="32,128")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--mixes", default=",".join(MIXES))
    args = p.parse_args()
    if args.model_path is None:
        from loraserve.tools.bench.cli import bench_model
        args.model_path = bench_model(Path("var/bench"))
    torch.manual_seed(0)
    for row in step_host(args.model_path, tuple(int(b) for b in args.batches.split(",")), args.vocab, args.steps,
                         tuple(args.mixes.split(","))):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
