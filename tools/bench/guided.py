"""What guided decoding costs on a tokenizer (runner/guided.py, docs/api.md "Structured output").

Compiling a format (first time, then from the compiler's cache), and the per-step host work of a
batch of guided rows through Guide.constrain, the engine's own call: each row's matcher fed the
token its row generated since the step before, its next-token bitmask filled, the batch's logits
copied and masked. Every row walks the same valid document, one token a step; the logits are
zeros on the CPU (their values do not change the work). The forward and sampling are not in it.

    python -m loraserve.tools.bench.guided [--tokenizer DIR] [--batches 1,8,32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from loraserve.runner.guided import Guide
from loraserve.scheduler.engine import Row
from loraserve.scheduler.types import BASE, ResponseFormat, SamplingParams

SCHEMA = json.dumps({"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["new", "vip"]}, "maxItems": 2}},
    "required": ["name", "age"]})
DOCUMENT = '{"name": "Ann Lee", "age": 42, "tags": ["vip", "new"]}'


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1e3, 3)


def guided_costs(tokenizer_dir: Path, batches: tuple[int, ...] = (1, 8, 32), rounds: int = 5) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    vocab = len(tokenizer)
    guide = Guide(tokenizer, vocab, frozenset({tokenizer.eos_token_id}), max(batches))
    out = []
    for name, fmt in (("json_schema", ResponseFormat(SCHEMA)), ("json_object", ResponseFormat())):
        started = time.perf_counter()
        guide.check(fmt)  # the first one also builds the compiler (the tokenizer's info)
        first = _ms(started)
        started = time.perf_counter()
        guide.check(fmt)
        out.append({"format": name, "vocab": vocab, "compile_first_ms": first, "compile_cached_ms": _ms(started)})
    document = tokenizer.encode(DOCUMENT, add_special_tokens=False)
    fmt, ids = ResponseFormat(SCHEMA), itertools.count()
    for batch in batches:
        logits = torch.zeros(batch, vocab)
        times = []
        for _ in range(rounds):
            seqs = [next(ids) for _ in range(batch)]
            for k in range(len(document) + 1):
                rows = [Row(s, BASE, (), (1,), document[:k], SamplingParams(), response_format=fmt) for s in seqs]
                started = time.perf_counter()
                _, _, faults = guide.constrain(rows, logits)
                times.append(time.perf_counter() - started)
                assert not faults, faults
        median = statistics.median(times)
        out.append({"batch": batch, "vocab": vocab, "steps": len(times), "median_us": round(median * 1e6),
                    "p90_us": round(sorted(times)[int(0.9 * len(times))] * 1e6),
                    "median_us_per_row": round(median * 1e6 / batch, 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, help="a HF tokenizer directory [the demo base model's, built under "
                                                  "var/demo by `make demo`]")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    for row in guided_costs(args.tokenizer or Path("var/demo/base"), tuple(int(b) for b in args.batches.split(",")),
                            args.rounds):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
