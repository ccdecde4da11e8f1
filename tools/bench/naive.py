"""The baseline everyone starts from (a server that swaps adapters per request): one request at a time
under a lock, `set_adapter` then `generate`. Adapters are loaded before timing starts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch


def run_naive(model_path: Path, store_root: Path, plan: list[tuple[str, str, int]], dtype: str = "float32") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    peft_model = with_adapters(model, store_root, sorted({a for a, _, _ in plan if a != "base"}))
    return naive_loop(peft_model, tokenizer, plan, model.device)


def with_adapters(model, store_root: Path, names: list[str]):
    """`model` as a PeftModel holding version 1 of every adapter in `names`."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, store_root / names[0] / "1", adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(store_root / name / "1", adapter_name=name)
    return peft_model.eval()


def naive_loop(peft_model, tokenizer, plan: list[tuple[str, str, int]], device: torch.device) -> dict:
    lock = threading.Lock()
    tokens, latencies = 0, []
    started = time.perf_counter()
    for adapter, prompt, max_new in plan:
        t0 = time.perf_counter()
        with lock, torch.inference_mode():
            peft_model.set_adapter(adapter)
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
            out = peft_model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
            tokens += out.shape[1] - inputs.input_ids.shape[1]  # .shape syncs a GPU: the request is done
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return {"requests": len(plan), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "req_per_s": len(plan) / wall, "latencies_s": latencies}
