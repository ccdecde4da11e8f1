"""Random-weight Llama models of real size, built locally (nothing is downloaded).

Throughput does not depend on what the weights say, so a random model of the right shape times
exactly like a trained one. Its greedy tokens are mostly ids the demo tokenizer cannot print:
count tokens, never text.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 0
    """0: the demo tokenizer's own size."""


SHAPES = {
    # The 1.1B model (about 2.2 GB in bfloat16).
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000),
    # An 8B-class Llama (Llama-3-8B's body with a 32k vocabulary; 16 GB in bfloat16).
    "8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32000),
    # The CPU test's stand-in: the same code path in seconds.
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
}


def build_random_llama(out: Path, shape: Shape, device: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `out/base` (weights, config and the demo tokenizer) unless it is already there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraserve.runner.demo import DemoSpec, train_tokenizer

    base = out / "base"
    if (base / "config.json").exists():
        return base
    staging = out / "_base"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = train_tokenizer(DemoSpec(), staging)
    config = LlamaConfig(
        vocab_size=shape.vocab or len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    started = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialising 8B parameters on a CPU takes minutes; on a GPU, seconds
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(staging)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()  # the servers and the reference child need the device whole
    staging.rename(base)
    print(f"built a random-weight Llama {shape} in {time.perf_counter() - started:.0f} s at {base}", file=sys.stderr)
    return base
