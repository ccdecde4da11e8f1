"""Synthetic adapters for benchmarks: N registered LoRA versions with random weights.

One PEFT adapter is made with peft (random, non-zero A and B), then N variants are written
by re-seeding its tensors, each with a passport naming the served base model, so the
server checks, hashes and loads them exactly like real ones. Building 500 takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from registry.identity import base_identity, sha256_file
from registry.passport import Passport, SmokeTest
from registry.store import CONFIG, WEIGHTS, Store, now_iso

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_store(model_path: Path, out: Path, count: int, rank: int = 16) -> Store:
    """Adapters bench0 .. bench{count-1} (active, version 1) in a fresh store at `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    template = out / "_template"
    base = AutoModelForCausalLM.from_pretrained(model_path)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                 init_lora_weights=False), adapter_name="bench")
    peft_model.save_pretrained(template, selected_adapters=["bench"])
    config = json.loads((template / "bench" / CONFIG).read_text())
    tensors = load_file(template / "bench" / WEIGHTS)
    identity = base_identity(model_path)
    store = Store(out)
    for i in range(count):
        target = store.version_dir(f"bench{i}", "1")
        target.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        save_file({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in tensors.items()}, target / WEIGHTS)
        (target / CONFIG).write_text(json.dumps(config))
        Passport(name=f"bench{i}", version="1", base_model=identity.model_id,
                 base_model_revision=identity.revision, weights_sha256=sha256_file(target / WEIGHTS),
                 created=now_iso(), status="active", task="bench", rank=rank, target_modules=TARGETS,
                 smoke_test=SmokeTest(True, now_iso(), [], "synthetic")).write(target)
    shutil.rmtree(template)
    store.reindex()
    return store
