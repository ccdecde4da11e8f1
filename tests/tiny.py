"""Tiny PEFT LoRA adapter directories for registry tests: real safetensors files, no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HIDDEN = 16


def tiny_adapter(out: Path, rank: int = 4, modules=("q_proj", "v_proj"), layers: int = 1, *,
                 ranks: dict[str, tuple[int, int]] | None = None, seed: int = 0, **config) -> Path:
    """Write adapter_config.json (r=`rank`, target_modules=`modules`, overridden by `config`)
    and weights of that rank; `ranks` forces (A rank, B rank) for chosen module leaves."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for leaf in modules:
            r_a, r_b = (ranks or {}).get(leaf, (rank, rank))
            key = f"base_model.model.model.layers.{layer}.self_attn.{leaf}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r_a, HIDDEN), dtype=np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((HIDDEN, r_b), dtype=np.float32)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules), **config}))
    return out


def fake_base(out: Path) -> Path:
    """A directory registry.identity can fingerprint (config.json + a weights file); enough for
    `register --no-smoke`, which never loads the model."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"_name_or_path": "tiny-base"}))
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(out / "model.safetensors"))
    return out
