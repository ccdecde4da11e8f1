"""Synthetic adapters for benchmarks: N registered LoRA versions with random weights.

peft names the tensors, then N variants with random, non-zero A and B are written, each with a
passport naming the served base model, so the server checks, hashes and loads them exactly like
real ones. Building 500 takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraserve.registry.identity import base_identity, sha256_file
from loraserve.registry.passport import Passport, SmokeTest, Status
from loraserve.registry.prepare import CONFIG, WEIGHTS
from loraserve.registry.snapshot import now_iso
from loraserve.registry.store import Store

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_store(model_path: Path, out: Path, count: int, rank: int = 16,
               dtype: torch.dtype = torch.float32, targets: list[str] = TARGETS, prefix: str = "bench") -> Store:
    """Adapters {prefix}0 .. {prefix}{count-1} (active, version 1, adapting `targets`) in a fresh
    store at `out`."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    # peft names and shapes the tensors on a weightless (meta) copy of the base, so an 8B base
    # costs nothing to template.
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(get_peft_model(base, lora)).items()}
    config = lora.to_dict()
    config["base_model_name_or_path"] = str(model_path)
    identity = base_identity(model_path)
    store = Store.local(out)
    for i in range(count):
        target = store.version_dir(f"{prefix}{i}", "1")
        target.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        save_file({k: (torch.randn(s, generator=g) * 0.05).to(dtype) for k, s in shapes.items()}, target / WEIGHTS)
        (target / CONFIG).write_text(json.dumps(config, default=sorted))
        Passport(name=f"{prefix}{i}", version="1", base_model=identity.model_id,
                 base_model_revision=identity.revision, weights_sha256=sha256_file(target / WEIGHTS),
                 created=now_iso(), status=Status.ACTIVE, task="bench", rank=rank, target_modules=list(targets),
                 smoke_test=SmokeTest(True, now_iso(), [], "synthetic")).write(target)
    store.reindex()
    return store
