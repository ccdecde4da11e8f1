"""What the HF stack reaches without this server, on the same device, model and loading code:
`generate` with a static cache (which transformers compiles into CUDA graphs on a GPU: the torch
ceiling), `generate` eager, peft's mixed batch (`adapter_names=`), and the naive baseline.

Runs in a child process (`python -m loraserve.tools.bench.ceiling SPEC_JSON`, one JSON line out) so every
byte it put on the device is gone before a server starts."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, ids: torch.Tensor, new_tokens: int, pad: int, **kwargs) -> None:
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=pad, **kwargs)


def _timed(run, batch: int, new_tokens: int, repeats: int, device: torch.device, warm=None) -> dict:
    (warm or run)()  # compilation and graph capture happen in the first call
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    wall = time.perf_counter() - started
    return {"batch": batch, "tokens": batch * new_tokens * repeats, "wall_s": round(wall, 3),
            "tok_per_s": round(batch * new_tokens * repeats / wall, 1)}


def measure(spec: dict) -> dict:
    from loraserve.runner.config import EngineConfig
    from loraserve.runner.loading import load_model
    from loraserve.tools.bench.naive import naive_loop, with_adapters

    tokenizer, model, device = load_model(EngineConfig(Path(spec["model_path"]), device=spec["device"],
                                                       dtype=spec["dtype"], quantization=spec["quantization"]))
    pad, new = tokenizer.pad_token_id, spec["new_tokens"]
    g = torch.Generator().manual_seed(0)

    def prompts(batch: int) -> torch.Tensor:
        return torch.randint(3, len(tokenizer), (batch, spec["prompt_tokens"]), generator=g).to(device)

    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    part = spec["part"]
    with torch.inference_mode():
        if part == "hf_static":
            for b in spec["batches"]:
                ids = prompts(b)
                r = _timed(lambda: _generate(model, ids, new, pad, cache_implementation="static"),
                           b, new, spec["repeats"], device)
                # transformers compiles the static-cache decode only where it can (CUDA, no CPU offload).
                r["compiled"] = getattr(model, "_compiled_call", None) is not None
                out[b] = r
        elif part == "hf_eager":
            for b in spec["batches"]:
                ids = prompts(b)
                out[b] = _timed(lambda: _generate(model, ids, new, pad), b, new, spec["repeats"], device,
                                warm=lambda: _generate(model, ids, 2, pad))
        elif part == "peft":
            plan = spec["plan"]
            peft_model = with_adapters(model, Path(spec["store"]), sorted({a for a, _, _ in plan}))
            out["peft_mixed"] = {}
            for b in spec["peft_batches"]:
                ids, names = prompts(b), [plan[i % len(plan)][0] for i in range(b)]
                # peft's mixed batch is slow enough that one timed pass says it (warm-up: 2 tokens).
                out["peft_mixed"][b] = _timed(lambda: _generate(peft_model, ids, new, pad, adapter_names=names),
                                              b, new, 1, device,
                                              warm=lambda: _generate(peft_model, ids, 2, pad, adapter_names=names))
            naive = naive_loop(peft_model, tokenizer, plan[:spec["naive_requests"]], device)
            out["naive"] = {k: round(v, 3) for k, v in naive.items() if k != "latencies_s"}
    return out


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
