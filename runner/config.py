"""How a TorchEngine is built and steps: the model, its devices, the KV pool, the adapter slots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    """What `loraserve serve` documents (server/config.py, one description per setting) under the
    same names; documented here are only what the server derives, or what means more here."""

    model_path: Path
    quantization: str = "none"
    device: str = "auto"
    dtype: str = "auto"
    load_threads: int = 2
    """Threads reading adapters from disk (the scheduler's limiter caps concurrent loads)."""
    max_rows: int = 16
    """Most sequences one decode step runs (the scheduler's max_batch_size)."""
    kv_cache_mib: float = 0
    """0: on cuda what gpu_memory_fraction leaves of the device, elsewhere CPU_KV_DEFAULT_MIB."""
    kv_block_size: int = 16
    gpu_memory_fraction: float = 0.90
    attention: str = "auto"
    max_model_len: int = 0
    max_loras: int = 64
    max_lora_rank: int = 64
    lora_target_modules: tuple[str, ...] = ()
    """Empty: every linear layer but lm_head (the server fills in what its store's adapters adapt).
    Names that match no linear layer wrap nothing (logged)."""
    vram_budget_bytes: int = 0
    """Caps the slot stacks' bytes (fewer slots than max_loras when it binds); 0 = no cap."""
    prefill_chunk_tokens: int = 512
    decode_graphs: str = "auto"
    """auto: decode replays CUDA graphs on cuda (runner/graphs.py), runs eagerly elsewhere; off:
    always eager; buffers: the graphs' static-buffer step without capture (checks it on a CPU)."""
    deterministic: bool = False
    """Steps run every row's forward alone (one row, its own adapter's rank) under torch's
    deterministic algorithms: one forward per row instead of one per step."""
