"""How a TorchEngine is built and steps: the model, its devices, the KV pool, the adapter slots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    quantization: str = "none"
    """none | nf4 | int8 (bitsandbytes)."""
    device: str = "auto"
    """auto picks cuda when present, else cpu."""
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16."""
    load_threads: int = 2
    """Threads reading adapters from disk (the scheduler's limiter caps concurrent loads)."""
    max_rows: int = 16
    """Most sequences one decode step runs (the scheduler's max_batch_size)."""
    kv_cache_mib: float = 0
    """KV pool budget; 0 = the default: on cuda, gpu_memory_fraction of the device less what is
    already allocated and a workspace estimate; elsewhere CPU_KV_DEFAULT_MIB; either way no more
    than max_rows sequences of max_model_len tokens can use."""
    kv_block_size: int = 16
    """Token positions per KV block."""
    gpu_memory_fraction: float = 0.90
    """cuda: the share of the device's memory this process may fill (weights, adapters, KV pool)."""
    attention: str = "auto"
    """Decode attention: flex (FlexAttention over the block tables; auto on cuda) or reference
    (a gather of each row's positions and SDPA; auto elsewhere)."""
    max_model_len: int = 0
    """Most tokens (prompt + generated) per sequence; 0 = the model's max_position_embeddings."""
    max_loras: int = 64
    """Adapters attached at once (slots in the stacks)."""
    max_lora_rank: int = 64
    """Largest adapter rank; every slot has room for it."""
    lora_target_modules: tuple[str, ...] = ()
    """Leaf names of the linear layers LoRA is applied to (wrapped, with slot stacks); an adapter
    adapting any other is refused (ADAPTER_INCOMPATIBLE). Empty: every linear layer but lm_head.
    Names that match no linear layer wrap nothing (logged)."""
    vram_budget_bytes: int = 0
    """Caps the slot stacks' bytes (fewer slots than max_loras when it binds); 0 = no cap."""
    prefill_chunk_tokens: int = 512
    """Prompt columns one prefill forward takes at most (longer prompts run in chunks); 0 = no limit."""
    decode_graphs: str = "auto"
    """auto: decode replays CUDA graphs on cuda (runner/graphs.py), runs eagerly elsewhere; off:
    always eager; buffers: the graphs' static-buffer step without capture (checks it on a CPU)."""
    deterministic: bool = False
    """Batch-invariant steps: every row's forward runs alone (one row, its own adapter's rank)
    under torch's deterministic algorithms, so nothing else in its step can change a row's
    scores. One forward per row instead of one per step."""
