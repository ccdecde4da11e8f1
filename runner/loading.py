"""Building what the engine steps: the base model (optionally bitsandbytes-quantized) on its
device, the LoRA path its wrapped layers take, and the KV pool sized to the memory left."""

from __future__ import annotations

import logging

import torch

from loraserve.runner.config import EngineConfig
from loraserve.runner.kvpool import KERNELS, KVPool, geometry_of

log = logging.getLogger(__name__)

CPU_KV_DEFAULT_MIB = 512


def refuse_unsupported_attention(config, max_len: int) -> None:
    """runner/kvpool.py's attention is full causal attention with no logit softcapping: a model
    that needs a sliding window within the served length, or softcapping, would silently
    answer wrong, so it is refused at start-up instead."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_len:
        raise ValueError(f"this model attends through a sliding window of {window} tokens, which loraserve's "
                         f"attention does not implement: serve it with --max-model-len {window} or less")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError("this model softcaps its attention logits, which loraserve's attention does not implement")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(cfg: EngineConfig):
    """Tokenizer and base model from a HF directory (never a hub download)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs: dict = {"dtype": dtype}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
    elif cfg.quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if cfg.quantization != "none":
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, local_files_only=True, **kwargs)
    if cfg.quantization == "none":
        model.to(device)
    model.eval()
    return tokenizer, model, device


def attention_kernel(attention: str, device: torch.device, block_size: int) -> str:
    """The decode attention: `attention` as asked, or for auto FlexAttention on cuda and the
    reference gather elsewhere. FlexAttention's cuda decode kernel tiles the keys by the KV block
    and multiplies them with Triton's tl.dot, which compiles only for a K dimension of at least 16
    (a power of two, as every tile is): with smaller blocks auto takes the reference kernel, and
    flex asked for is refused here rather than by the first decode step."""
    if attention not in KERNELS:
        raise ValueError(f"attention must be one of {', '.join(KERNELS)}, not {attention!r}")
    tiles = device.type != "cuda" or (block_size >= 16 and block_size & (block_size - 1) == 0)
    if attention == "flex" and not tiles:
        raise ValueError(f"--attention flex on cuda needs --kv-block-size a power of two of at least 16 (its decode "
                         f"kernel's tl.dot), not {block_size}")
    if attention != "auto":
        return attention
    if device.type != "cuda":
        return "reference"
    if not tiles:
        log.warning("KV blocks of %d positions are too small for FlexAttention's cuda kernel (a power of two of at "
                    "least 16): decode attention is the reference gather, without CUDA graphs", block_size)
        return "reference"
    return "flex"


def lora_kernel(device: torch.device) -> str:
    """How wrapped layers read each row's adapter slot in place (runner/lora.py): Triton's BGMV
    kernels on cuda (imported only there), a matmul pair per adapter present elsewhere."""
    if device.type != "cuda":
        return "grouped"
    try:
        import triton  # noqa: F401 (torch's CUDA wheels bring it)
    except ImportError:
        log.warning("triton is not installed: LoRA takes the grouped path on cuda (a host sync per step, so "
                    "decode graphs fall back to eager decode)")
        return "grouped"
    return "triton"


def allocate_pool(cfg: EngineConfig, model, device: torch.device, dtype: torch.dtype) -> KVPool:
    """As many blocks as the budget holds (runner/kvpool.py). max_model_len bounds one sequence
    only; a pool that cannot hold even one such sequence is refused with the figures."""
    config = model.config
    limit = int(config.max_position_embeddings)
    max_len = min(cfg.max_model_len, limit) if cfg.max_model_len else limit
    if cfg.kv_block_size < 1:
        raise ValueError("kv_block_size must be at least 1")
    geometry = geometry_of(config, max_len, cfg.kv_block_size)
    per_block = geometry.bytes_per_block(dtype)
    if cfg.kv_cache_mib:
        budget, source = int(cfg.kv_cache_mib * 2**20), f"kv_cache_mib {cfg.kv_cache_mib:g}"
    else:
        budget, source = _default_kv_budget(cfg, config, device, dtype)
        # More blocks than max_rows sequences of max_model_len tokens can ever hold would sit idle.
        budget = min(budget, (cfg.max_rows * geometry.blocks_per_sequence + 1) * per_block)
    blocks = budget // per_block - 1  # less the scratch block
    if blocks < geometry.blocks_per_sequence:
        raise ValueError(
            f"the KV pool ({source}: {budget / 2**20:.1f} MiB, {max(blocks, 0)} blocks of "
            f"{geometry.block_size} tokens at {geometry.bytes_per_token(dtype) // 1024} KiB per token) "
            f"holds no sequence of max_model_len {max_len} tokens, which needs {geometry.blocks_per_sequence} "
            f"blocks ({geometry.blocks_per_sequence * per_block / 2**20:.1f} MiB): lower --max-model-len "
            f"or raise --kv-cache-mib")
    return KVPool(geometry, blocks, device, dtype)


def _default_kv_budget(cfg: EngineConfig, config, device: torch.device, dtype: torch.dtype) -> tuple[int, str]:
    if device.type != "cuda":
        return CPU_KV_DEFAULT_MIB * 2**20, f"the default {CPU_KV_DEFAULT_MIB} MiB off cuda"
    free, total = torch.cuda.mem_get_info(device)
    # Activations of the largest forward (a prefill chunk or a full decode batch), its fp32
    # logits, and CUDA graphs' and cuBLAS's workspace: an estimate, not a profile.
    tokens = max(cfg.prefill_chunk_tokens or 512, cfg.max_rows)
    width = 4 * config.hidden_size + 2 * getattr(config, "intermediate_size", 4 * config.hidden_size)
    workspace = tokens * (width * dtype.itemsize + config.vocab_size * 4) + 512 * 2**20
    budget = int(total * cfg.gpu_memory_fraction) - (total - free) - workspace
    return max(budget, 0), (f"gpu_memory_fraction {cfg.gpu_memory_fraction:g} of {total / 2**30:.1f} GiB "
                            f"less {(total - free) / 2**30:.1f} GiB in use and {workspace / 2**20:.0f} MiB "
                            f"of workspace")
