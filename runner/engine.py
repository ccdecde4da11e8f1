"""The torch side: one base model (optionally bitsandbytes-quantized) plus LoRA adapters.

All torch work runs on one dedicated thread (TorchEngine's executor), so the
event loop never blocks and the model is never touched by two threads. No batch
lives here: each step gets its rows from the scheduler (their KV pool slots,
block tables in the paged
runner/kvpool.py, and their adapters, whose slots runner/lora.py reads in place
per row), so there is neither a cache to reconcile nor a global "active adapter" to
race on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from registry.store import CONFIG, WEIGHTS  # safetensors only: pickle weights can run code
from registry.weights import WeightsError, check_against_config, held_bytes, weight_facts
from runner import determinism
from runner.detok import decode_new
from runner.graphs import CaptureFailed, DecodeGraphs
from runner.guided import Guide
from runner.kvpool import (ATTENTION, KERNELS, KVPool, MixedContext, decode_view, geometry_of, plan_prefill,
                           prefill_context)
from runner.lora import (LoRALinear, LoraWeights, RowSlots, UnsupportedAdapter, parse_peft, slot_bytes,
                         wrap_linear_layers)
from runner.logprobs import Logprobs
from runner.sampling import Processor, Sampler
from runner.staging import Staging, decode_rows, decode_views
from scheduler.engine import Row, StepResult, Text, TextJob
from scheduler.errors import AdapterIncompatible, AdapterLoadFailed, GenerationFailed, LoraServeError, OutOfMemory
from scheduler.types import AdapterRef, ResponseFormat

log = logging.getLogger(__name__)

CPU_KV_DEFAULT_MIB = 512


def _fetch(tensor: torch.Tensor) -> list:
    """The one device-to-host transfer of a step (a sync on cuda): its [2, B] tokens and finite
    flags, or, when a row asks for logprobs, those and the logprobs packed flat as float64
    (runner/logprobs.py). Nothing else in a step reads a device value on the host
    (tests/test_syncs.py)."""
    return tensor.tolist()


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: whether each row's scores are all finite. 0 x a finite score is 0, 0 x inf or NaN
    is NaN, so a row sums to 0 exactly when all its scores are finite (no [B, vocab] bool tensor:
    isfinite().all() took 2-4x as long on a CPU)."""
    return (logits * 0).sum(dim=-1) == 0


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


def _refuse_unsupported_attention(config, max_len: int) -> None:
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


def _prompt_positions(row: Row) -> tuple[int, int]:
    """(first, count): the context positions of this prefill chunk whose scores predict a prompt
    token (position p predicts token p + 1) when the row asks for prompt logprobs, else (0, 0)."""
    if row.prompt_logprobs is None:
        return 0, 0
    end = min(row.upto or len(row.context), len(row.prompt_ids) - 1)
    return row.cached, max(end - row.cached, 0)


class TorchEngine:
    """Implements scheduler.engine.Engine over a HF causal LM."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # Text is decoded here while the engine thread runs the next step (Engine.detokenize).
        self._detokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detokenize")
        self._loaders = ThreadPoolExecutor(max_workers=cfg.load_threads, thread_name_prefix="adapter-load")
        self._ram: dict[AdapterRef, LoraWeights] = {}
        self._verified: dict[Path, tuple] = {}  # weights file -> the stat it had when its sha256 matched
        self._slots: dict[AdapterRef, tuple[int, dict[str, int]]] = {}  # attached: slot, rank per module
        self._free_slots: list[int] = []
        self._slot_bytes = 0
        self._rows = RowSlots()
        self._layers: dict[str, LoRALinear] = {}
        self._unwrapped: frozenset[str] = frozenset()  # paths of linear layers LoRA is not applied to
        self._module_names: frozenset[str] = frozenset()
        self._dtype = torch.float32
        self._tokenizer = None
        self._model = None
        self._device = torch.device("cpu")
        self._pool: KVPool | None = None
        self._kernel = "reference"
        self._graphs: DecodeGraphs | None = None
        self._inputs: Staging | None = None  # eager decode's tokens, lengths, slots and block tables
        self._prefill_inputs: Staging | None = None  # a prefill's or mixed step's (PrefillPlan.values and more)
        self._sampler: Sampler | None = None
        self._processor: Processor | None = None
        self._logprobs: Logprobs | None = None
        self._copy_stream = None  # cuda: adapters are copied into their slots on a side stream
        self._copies: dict[int, object] = {}  # slot -> cuda event of its last copy, until a step awaits it
        self._pad = 0
        self._eos: frozenset[int] = frozenset()
        self._holds_determinism = False
        self._guide: Guide | None = None

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        await self._run(self._load)

    def _load(self) -> None:
        if self.cfg.deterministic:
            determinism.hold()
            self._holds_determinism = True
        self._tokenizer, self._model, self._device = load_model(self.cfg)
        self._dtype = resolve_dtype(self.cfg.dtype, self._device)
        self._module_names = frozenset(n.rsplit(".", 1)[-1] for n, _ in self._model.named_modules() if n)
        if self.cfg.attention not in KERNELS:
            raise ValueError(f"attention must be one of {', '.join(KERNELS)}, not {self.cfg.attention!r}")
        self._kernel = self.cfg.attention if self.cfg.attention != "auto" else (
            "flex" if self._device.type == "cuda" else "reference")
        # A captured step has fixed shapes: only the block mask reads a row's length without a host int.
        capture = self._device.type == "cuda" and self._kernel == "flex" and self.cfg.decode_graphs == "auto"
        # FlexAttention is compiled per shape: uncaptured decode takes the graphs' row buckets too.
        graphs = self.cfg.decode_graphs == "buffers" or capture or self._kernel == "flex"
        # Each row reads its own adapter's slot in place: Triton's BGMV kernels on cuda (imported
        # only there), a matmul pair per adapter present elsewhere (runner/lora.py).
        self._rows = RowSlots(self._lora_kernel())
        linears = {n for n, m in self._model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"}
        self._layers = wrap_linear_layers(self._model, self._rows, tuple(self.cfg.lora_target_modules))
        self._unwrapped = frozenset(linears - set(self._layers))
        stray = sorted(set(self.cfg.lora_target_modules) - self.lora_modules())
        if stray:
            log.warning("lora_target_modules %s name no linear layer of this model", stray)
        log.info("LoRA applies to %s: %d of %d linear layers (%s path)",
                 ", ".join(sorted(self.lora_modules())) or "nothing", len(self._layers), len(linears), self._rows.kernel)
        self._allocate_lora_slots()
        self._pool = self._allocate_pool()
        _refuse_unsupported_attention(self._model.config, self._pool.geometry.max_len)
        self._model.set_attn_implementation(ATTENTION)
        if self._device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self._device)
        self._pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        rows = self.cfg.max_rows
        self._inputs = Staging(rows * (3 + self._pool.geometry.blocks_per_sequence), self._device)
        self._prefill_inputs = Staging(8 * max(self.cfg.prefill_chunk_tokens, rows), self._device)
        self._sampler = Sampler(self._device, rows)
        self._logprobs = Logprobs(self._device, rows)
        if graphs:
            self._graphs = DecodeGraphs(self._model_step, self._pool, self._pad, capture=capture,
                                        max_rows=self.cfg.max_rows, kernel=self._kernel)
            if capture:
                self._capture_graphs()
        eos = self._model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self._eos = frozenset(i for i in (*eos, self._tokenizer.eos_token_id) if i is not None)
        self._guide = Guide(self._tokenizer, self._model.get_output_embeddings().out_features, self._eos, rows)
        self._processor = Processor(self._device, self._eos, rows)
        pool, g = self._pool, self._pool.geometry
        log.info("loaded base model %s on %s (quantization=%s); KV pool: %d blocks of %d tokens = %d tokens, "
                 "%.1f MiB (%d KiB per token; %d tokens per sequence at most); attention: %s; decode: %s%s",
                 self.cfg.model_path, self._device, self.cfg.quantization, pool.blocks, g.block_size, pool.tokens,
                 pool.nbytes / 2**20, g.bytes_per_token(self._dtype) // 1024, g.max_len, self._kernel,
                 self.decode_mode, "; deterministic: one row per forward" if self.cfg.deterministic else "")

    def _uncaptured(self) -> DecodeGraphs | None:
        """After a failed capture: the graphs' bucketed step without capture for FlexAttention (one
        compile per bucket, not per batch size), plain eager decode for the reference kernel."""
        if self._kernel != "flex":
            return None
        return DecodeGraphs(self._model_step, self._pool, self._pad, capture=False, max_rows=self.cfg.max_rows,
                            kernel=self._kernel)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        """All decode graphs before traffic, so no request waits for a capture (deterministic
        engines decode one row at a time: one-row graphs only)."""
        started = time.perf_counter()
        rows = 1 if self.cfg.deterministic else self.cfg.max_rows
        try:
            count = self._graphs.capture_all(rows)
        except CaptureFailed as exc:  # e.g. quantized kernels that cannot be captured
            log.warning("%s; decode runs uncaptured (as with --no-cuda-graphs)", exc)
            self._graphs = self._uncaptured()
            return
        log.info("captured %d decode graphs (up to %d rows, LoRA on and off) in %.1f s", count, rows,
                 time.perf_counter() - started)

    def _lora_kernel(self) -> str:
        if self._device.type != "cuda":
            return "grouped"
        try:
            import triton  # noqa: F401 (torch's CUDA wheels bring it)
        except ImportError:
            log.warning("triton is not installed: LoRA takes the grouped path on cuda (a host sync per step, so "
                        "decode graphs fall back to eager decode)")
            return "grouped"
        return "triton"

    def _allocate_lora_slots(self) -> None:
        """Every wrapped layer's slot stacks at (slots + 1, max_lora_rank), once: as many slots as
        max_loras allows and the VRAM budget holds. The VRAM tier then budgets whole slots."""
        self._slot_bytes = slot_bytes(self._layers.values(), self.cfg.max_lora_rank, self._dtype)
        slots = self.cfg.max_loras
        if self.cfg.vram_budget_bytes and self._slot_bytes:
            slots = min(slots, self.cfg.vram_budget_bytes // self._slot_bytes)
        if slots < 1:
            raise ValueError(f"the VRAM budget holds no adapter: one slot of rank {self.cfg.max_lora_rank} "
                             f"takes {self._slot_bytes / 2**20:.2f} MiB on this model")
        for layer in self._layers.values():
            layer.allocate(slots + 1, self.cfg.max_lora_rank, self._device, self._dtype)
        self._free_slots = list(range(slots, 0, -1))

    def _allocate_pool(self) -> KVPool:
        """As many blocks as the budget holds (runner/kvpool.py). max_model_len bounds one sequence
        only; a pool that cannot hold even one such sequence is refused with the figures."""
        config = self._model.config
        limit = int(config.max_position_embeddings)
        max_len = min(self.cfg.max_model_len, limit) if self.cfg.max_model_len else limit
        if self.cfg.kv_block_size < 1:
            raise ValueError("kv_block_size must be at least 1")
        geometry = geometry_of(config, max_len, self.cfg.kv_block_size)
        per_block = geometry.bytes_per_block(self._dtype)
        if self.cfg.kv_cache_mib:
            budget, source = int(self.cfg.kv_cache_mib * 2**20), f"kv_cache_mib {self.cfg.kv_cache_mib:g}"
        else:
            budget, source = self._default_kv_budget(geometry)
            # More blocks than max_rows sequences of max_model_len tokens can ever hold would sit idle.
            budget = min(budget, (self.cfg.max_rows * geometry.blocks_per_sequence + 1) * per_block)
        blocks = budget // per_block - 1  # less the scratch block
        if blocks < geometry.blocks_per_sequence:
            raise ValueError(
                f"the KV pool ({source}: {budget / 2**20:.1f} MiB, {max(blocks, 0)} blocks of "
                f"{geometry.block_size} tokens at {geometry.bytes_per_token(self._dtype) // 1024} KiB per token) "
                f"holds no sequence of max_model_len {max_len} tokens, which needs {geometry.blocks_per_sequence} "
                f"blocks ({geometry.blocks_per_sequence * per_block / 2**20:.1f} MiB): lower --max-model-len "
                f"or raise --kv-cache-mib")
        return KVPool(geometry, blocks, self._device, self._dtype)

    def _default_kv_budget(self, geometry) -> tuple[int, str]:
        if self._device.type != "cuda":
            return CPU_KV_DEFAULT_MIB * 2**20, f"the default {CPU_KV_DEFAULT_MIB} MiB off cuda"
        free, total = torch.cuda.mem_get_info(self._device)
        config = self._model.config
        # Activations of the largest forward (a prefill chunk or a full decode batch), its fp32
        # logits, and CUDA graphs' and cuBLAS's workspace: an estimate, not a profile.
        tokens = max(self.cfg.prefill_chunk_tokens or 512, self.cfg.max_rows)
        width = 4 * config.hidden_size + 2 * getattr(config, "intermediate_size", 4 * config.hidden_size)
        workspace = tokens * (width * self._dtype.itemsize + config.vocab_size * 4) + 512 * 2**20
        budget = int(total * self.cfg.gpu_memory_fraction) - (total - free) - workspace
        return max(budget, 0), (f"gpu_memory_fraction {self.cfg.gpu_memory_fraction:g} of {total / 2**30:.1f} GiB "
                                f"less {(total - free) / 2**30:.1f} GiB in use and {workspace / 2**20:.0f} MiB "
                                f"of workspace")

    async def close(self) -> None:
        self._loaders.shutdown(wait=True)
        self._executor.shutdown(wait=True)
        self._detokenizer.shutdown(wait=True)
        if self._holds_determinism:
            self._holds_determinism = False
            determinism.release()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- tokenizer (thread-safe; callers may use their own threads) ----------
    @property
    def model_name(self) -> str:
        return Path(self.cfg.model_path).name

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def max_context(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""
        return self._pool.geometry.max_len

    @property
    def kv_blocks(self) -> int:
        """Blocks in the KV pool (0 .. kv_blocks-1; the scratch block is not among them)."""
        return self._pool.blocks

    @property
    def kv_block_size(self) -> int:
        return self._pool.geometry.block_size

    @property
    def attention_kernel(self) -> str:
        """What decode attention runs: "flex" or "reference"."""
        return self._kernel

    def kv_bytes(self) -> int:
        return self._pool.nbytes

    def weights_bytes(self) -> dict[str, int]:
        """The base model's parameters and buffers by device ("cpu", "cuda:0"), quantized ones as
        packed (the LoRA slot stacks are not among them: stack_bytes)."""
        held: dict[str, int] = {}
        for t in (*self._model.parameters(), *self._model.buffers()):
            held[str(t.device)] = held.get(str(t.device), 0) + t.nbytes
        return held

    @property
    def decode_mode(self) -> str:
        """How decode steps run: "cuda graphs", "static buffers" (the graphs' step, uncaptured) or "eager"."""
        if self._graphs is None:
            return "eager"
        return "cuda graphs" if self._graphs.capturing else "static buffers"

    def module_names(self) -> frozenset[str]:
        """Leaf names of the model's modules (what an adapter's target_modules may name)."""
        return self._module_names

    def linear_modules(self) -> frozenset[str]:
        """Leaf names of the linear layers LoRA could be applied to (all but lm_head)."""
        return frozenset(path.rsplit(".", 1)[-1] for path in (*self._layers, *self._unwrapped))

    def lora_modules(self) -> frozenset[str]:
        """Leaf names of the linear layers LoRA is applied to (an adapter may adapt only these)."""
        return frozenset(path.rsplit(".", 1)[-1] for path in self._layers)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True)

    def check_format(self, fmt: ResponseFormat) -> None:
        """Raises InvalidArgument naming response_format.json_schema if `fmt` cannot be enforced;
        compiles it for its steps otherwise (milliseconds to seconds: not on the event loop)."""
        self._guide.check(fmt)

    @property
    def tokenizer(self):
        """The base model's transformers tokenizer (runner/tokens.py wraps it for the edge)."""
        return self._tokenizer

    # -- adapters (scheduler.tiers.TierEngine) ------------------------------
    # scheduler/tiers.py decides; this only moves weights. Reading (disk -> RAM, parsed
    # and checked) runs on the loader threads, overlapping compute; attach/demote/detach
    # run on the engine thread. Each version is a separate entry, so a new version never
    # disturbs rows still running on the old one.
    def bytes_once_read(self, adapter: AdapterRef) -> int:
        """From the file's header: its tensors' elements in the serving dtype (a float32 file
        served in bfloat16 takes half its size in RAM)."""
        return held_bytes(Path(adapter.path) / WEIGHTS, self._dtype.itemsize)

    async def fetch(self, adapter: AdapterRef) -> int:
        try:
            weights = await asyncio.get_running_loop().run_in_executor(self._loaders, self._read, adapter)
        except LoraServeError:
            raise
        except UnsupportedAdapter as exc:
            raise AdapterIncompatible(adapter.key, str(exc)) from exc
        except Exception as exc:  # a bad adapter fails its own requests only
            log.warning("reading adapter %s from %s failed: %s", adapter.key, adapter.path, exc)
            raise AdapterLoadFailed(adapter.key, f"{type(exc).__name__}: {exc}") from exc
        self._ram[adapter] = weights
        return weights.nbytes

    def _read(self, adapter: AdapterRef) -> LoraWeights:
        from safetensors.torch import load as safetensors_load

        config = json.loads((Path(adapter.path) / CONFIG).read_text())
        path = Path(adapter.path) / WEIGHTS
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            blob = f.read()
        # A file already verified is not hashed again until it is replaced or rewritten (another
        # inode, size or mtime): re-reading an evicted adapter costs the read, not a sha256 too.
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, adapter.sha256)
        if adapter.sha256 and self._verified.get(path) != stamp:
            if hashlib.sha256(blob).hexdigest() != adapter.sha256:
                raise AdapterIncompatible(adapter.key, "its weights file does not match the sha256 in its passport",
                                          reason="WEIGHTS_HASH_MISMATCH")
            self._verified[path] = stamp
        facts = weight_facts(blob)  # unreadable: a load failure
        try:  # the same facts-from-the-tensors check as registration, on the very bytes just hashed
            check_against_config(facts, config)
        except WeightsError as exc:
            raise AdapterIncompatible(adapter.key, str(exc)) from exc
        weights = parse_peft(config, safetensors_load(blob))
        for module, (a_t, b_t) in weights.modules.items():
            if a_t.shape[1] > self.cfg.max_lora_rank:
                raise AdapterIncompatible(adapter.key, f"{module} has rank {a_t.shape[1]} in its weights; this "
                                          f"server's slots hold rank {self.cfg.max_lora_rank} at most")
            layer = self._layers.get(module)
            if layer is None and module in self._unwrapped:
                leaf = module.rsplit(".", 1)[-1]
                raise AdapterIncompatible(adapter.key, f"it adapts {leaf} ({module}), which this server does not "
                                          f"apply LoRA to: restart it with --lora-target-modules including {leaf}")
            if layer is None:
                raise AdapterIncompatible(adapter.key, f"the base model has no linear layer {module!r}")
            if (a_t.shape[0], b_t.shape[1]) != (layer.in_features, layer.out_features):
                raise AdapterIncompatible(adapter.key, f"{module} is {a_t.shape[0]}->{b_t.shape[1]} in the adapter "
                                          f"but {layer.in_features}->{layer.out_features} in the base model")
        # Page-locked host memory lets the attach copy run asynchronously on CUDA.
        return weights.to(torch.device("cpu"), self._dtype, pin=self._device.type == "cuda")

    async def attach(self, adapter: AdapterRef) -> None:
        await self._run(self._attach, adapter)

    def _attach(self, adapter: AdapterRef) -> None:
        weights = self._ram[adapter]
        slot = self._free_slots.pop()  # the VRAM tier's budget is exactly the slots: one is free
        try:
            with self._copying(slot):
                for path, entry in weights.modules.items():
                    self._layers[path].write(slot, entry)
        except BaseException:  # the adapter stays in RAM and the slot free, as the books say
            with self._copying(slot):
                for path in weights.modules:
                    self._layers[path].write(slot, None)
            self._free_slots.append(slot)
            raise
        del self._ram[adapter]
        self._slots[adapter] = (slot, {path: a_t.shape[1] for path, (a_t, _) in weights.modules.items()})

    async def demote(self, adapter: AdapterRef) -> None:
        await self._run(self._demote, adapter)

    def _demote(self, adapter: AdapterRef) -> None:
        slot, ranks = self._slots[adapter]
        self._await_copy(slot)
        weights = LoraWeights({path: self._layers[path].read(slot, r) for path, r in ranks.items()})
        self._ram[adapter] = weights.to(torch.device("cpu"), self._dtype, pin=self._device.type == "cuda")
        self._detach(adapter)

    async def detach(self, adapter: AdapterRef) -> None:
        await self._run(self._detach, adapter)

    def _detach(self, adapter: AdapterRef) -> None:
        slot, ranks = self._slots.pop(adapter)
        with self._copying(slot):
            for path in ranks:
                self._layers[path].write(slot, None)
        self._free_slots.append(slot)

    @contextlib.contextmanager
    def _copying(self, slot: int):
        """On cuda, a slot's writes run on the copy stream, so attaching an adapter overlaps the
        steps of rows that do not use it; a step using the slot waits for them (_await_copy).
        The copy stream first waits for the steps already queued (a slot freed by a detach may
        still be read by one)."""
        if self._copy_stream is None:
            yield
            return
        self._copy_stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._copy_stream):
            yield
            event = torch.cuda.Event()
            event.record()
        self._copies[slot] = event

    def _await_copy(self, slot: int) -> None:
        event = self._copies.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self._device).wait_event(event)

    def drop(self, adapter: AdapterRef) -> None:
        self._ram.pop(adapter, None)

    def stack_bytes(self) -> int:
        """Device bytes of the adapter slot stacks, reserved once at start-up."""
        return sum(t.nbytes for layer in self._layers.values() for t in (layer.a, layer.b) if t is not None)

    def attached_bytes(self, adapter: AdapterRef) -> int:
        """What an attached adapter occupies on the device: one whole slot, whatever its rank."""
        return self._slot_bytes

    @property
    def lora_slots(self) -> int:
        """Adapters attached at once: max_loras, fewer where the VRAM budget holds fewer."""
        return len(self._free_slots) + len(self._slots)

    @property
    def lora_budget_bytes(self) -> int:
        """The VRAM tier's budget: the reserved slots, each counted whole."""
        return self.lora_slots * self._slot_bytes

    # -- steps ---------------------------------------------------------------
    # A step is a function of the rows it is given: it writes only into those rows' KV blocks
    # (positions their lengths do not cover yet) and returns one result per row, or raises
    # having changed nothing another row reads. The scheduler retries subsets on failure, so
    # every stage below may raise; none leaves anything behind.
    async def scrub(self, blocks: Sequence[int]) -> None:
        await self._run(self._scrub, list(blocks))

    @torch.inference_mode()
    def _scrub(self, blocks: list[int]) -> None:
        self._pool.scrub(blocks)

    async def prefill(self, rows: Sequence[Row]) -> list[StepResult]:
        return await self._run(self._typed, self._prefill, list(rows))

    async def decode(self, rows: Sequence[Row]) -> list[StepResult]:
        return await self._run(self._typed, self._decode, list(rows))

    async def step(self, rows: Sequence[Row]) -> list[StepResult]:
        return await self._run(self._typed, self._step, list(rows))

    def _typed(self, step, rows):
        """torch's CUDA and CPU out-of-memory errors become OutOfMemory (the scheduler splits the
        rows and retries); what was allocated for the failed step is released."""
        try:
            if self.cfg.deterministic:  # each row alone: no other row can enter its sums
                return [result for row in rows for result in step([row])]
            return step(rows)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                raise
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"not enough {self._device.type} memory for this batch step") from exc

    def _step(self, rows: list[Row]) -> list[StepResult]:
        """Rows that prefill a chunk (Row.prefill) and rows that decode: one forward when both are
        there; decode alone goes through the decode graphs."""
        chunks = sum(r.prefill for r in rows)
        if not chunks:
            return self._decode(rows)
        return self._prefill(rows) if chunks == len(rows) else self._mixed(rows)

    @torch.inference_mode()
    def _prefill(self, rows: list[Row]) -> list[StepResult]:
        """Each row computes its context (prompt, and what it generated before a preemption) past the
        positions a shared prefix already holds; its next token comes from the last one."""
        fed, tables, cached = [list(r.fed) for r in rows], [list(r.blocks) for r in rows], [r.cached for r in rows]
        width = max(map(len, fed))
        wanted = [_prompt_positions(r) for r in rows]
        picked, places = [], []
        # Long prompts run in chunks of columns, so activations and masks stay bounded whatever the
        # prompt's length; each chunk writes its keys into the pool, where the next reads them.
        # Left padding puts every row's last token in the last column (logits_to_keep=1); rows
        # asking for prompt logprobs keep the columns from the first of theirs on ([B, K, vocab]).
        chunk = self.cfg.prefill_chunk_tokens or width
        for begin in range(0, width, chunk):
            end = min(begin + chunk, width)
            plan = plan_prefill(tables, cached, fed, self._pool.scratch, begin, end)
            spans = []  # asked positions within this chunk: (row, first column, end column, first position)
            for i, (first, count) in enumerate(wanted):
                column = width - len(fed[i]) + first - cached[i]  # row i's position `first` sits there
                lo, hi = max(column, begin), min(column + count, end)
                if lo < hi:
                    spans.append((i, lo - begin, hi - begin, first + lo - column))
            kept = end - begin - min((lo for _, lo, _, _ in spans), default=end - begin - 1)
            flat = [i * kept + c - (end - begin - kept) for i, lo, hi, _ in spans for c in range(lo, hi)]
            dev = self._prefill_inputs.send([*plan.values, *flat])
            ctx, ids, positions = prefill_context(self._pool, plan, dev[:len(plan.values)])
            logits = self._forward(rows, ids, positions, ctx, None, kept if spans else None)
            if flat:
                picked.append(logits.flatten(0, 1).index_select(0, dev[len(plan.values):]))
                places += [(i, rows[i].prompt_ids[p + 1]) for i, lo, hi, p0 in spans for p in range(p0, p0 + hi - lo)]
                logits = logits[:, -1]
        return self._results(rows, logits, (torch.cat(picked), places) if picked else None)

    @torch.inference_mode()
    def _mixed(self, rows: list[Row]) -> list[StepResult]:
        """Decode rows and prefill chunks in one forward (kvpool.MixedContext): the step's tokens
        packed into one sequence, its inputs sent in one copy; the logits kept are each decode
        row's and each chunk's last token's."""
        decoding, chunks = [r for r in rows if not r.prefill], [r for r in rows if r.prefill]
        n, fed = len(decoding), [list(r.fed) for r in chunks]
        plan = plan_prefill([list(r.blocks) for r in chunks], [r.cached for r in chunks], fed, self._pool.scratch)
        lengths = [r.length for r in decoding]
        slots = [self._lora_slot(r) for r in decoding]
        for row, tokens in zip(chunks, fed):
            slots += [self._lora_slot(row)] * len(tokens)
        ends = list(itertools.accumulate(map(len, fed), initial=n))[1:]
        # Columns of prompt positions asked for, after each row's own: chunk j's position p sits at
        # column ends[j] - len(fed[j]) + p - cached.
        asked, places = [], []
        for j, row in enumerate(chunks):
            first, count = _prompt_positions(row)
            column = ends[j] - len(fed[j]) + first - row.cached
            asked += range(column, column + count)
            places += [(n + j, t) for t in row.prompt_ids[first + 1:first + 1 + count]]
        flat, width = decode_rows([r.generated[-1] for r in decoding], lengths, [0] * n,
                                  [r.blocks for r in decoding], 0, self._pad, self._pool.scratch)
        packed = [*flat, *plan.values, *slots, *range(n), *(e - 1 for e in ends), *asked]
        dev = self._prefill_inputs.send(packed)
        inputs, table_t = decode_views(dev[:len(flat)], n, width)
        dev = dev[len(flat):]
        ctx, _, _ = prefill_context(self._pool, plan, dev[:len(plan.values)])
        slots_t, keep = dev[len(plan.values):].split([len(slots), n + len(chunks) + len(asked)])
        ids = torch.cat((inputs[0], dev[:plan.tokens])).unsqueeze(0)  # [1, N]
        positions = torch.cat((inputs[1], dev[3 * plan.tokens:4 * plan.tokens])).unsqueeze(0)
        # The decode rows' keys are gathered (the reference read), as a prefill's are: FlexAttention
        # compiles per row count, which the graphs' buckets bound for decode steps but not here.
        ctx = MixedContext(decode_view(self._pool, table_t.to(torch.int32), inputs[1], "reference", max(lengths) + 1),
                           ctx, n)
        logits = self._forward([*decoding, *chunks], ids, positions, ctx, (tuple(slots), slots_t), keep)
        prompt = (logits[n + len(chunks):], places) if asked else None
        results = dict(zip((r.seq_id for r in (*decoding, *chunks)),
                           self._results([*decoding, *chunks], logits[:n + len(chunks)], prompt)))
        return [results[r.seq_id] for r in rows]

    @torch.inference_mode()
    def _decode(self, rows: list[Row]) -> list[StepResult]:
        tokens = [r.generated[-1] for r in rows]
        lengths = [r.length for r in rows]
        tables = [r.blocks for r in rows]
        lora = [self._lora_slot(r) for r in rows]
        if self._graphs is not None:
            try:
                return self._results(rows, self._graphs.run(tokens, lengths, tables, lora))
            except CaptureFailed as exc:  # e.g. quantized kernels that cannot be captured: uncaptured from now on
                log.warning("%s; decode runs eagerly from now on (as with --no-cuda-graphs)", exc)
                self._graphs = self._uncaptured()
                if self._graphs is not None:
                    return self._results(rows, self._graphs.run(tokens, lengths, tables, lora))
        # One copy in (runner/staging.py): every per-row input, then views of it on the device.
        flat, width = decode_rows(tokens, lengths, lora, tables, 0, self._pad, self._pool.scratch)
        packed, table_t = decode_views(self._inputs.send(flat), len(rows), width)
        ids, lengths_t, slots = packed[0].unsqueeze(1), packed[1], packed[2]
        ctx = decode_view(self._pool, table_t.to(torch.int32), lengths_t, self._kernel, max(lengths) + 1)
        return self._results(rows, self._forward(rows, ids, lengths_t.unsqueeze(1), ctx, (tuple(lora), slots)))

    def _forward(self, rows: list[Row], ids: torch.Tensor, positions: torch.Tensor, ctx,
                 slots: tuple[tuple[int, ...], torch.Tensor] | None = None, keep: torch.Tensor | int | None = None):
        """[B, vocab] float32 logits of each row's next token. `slots`: the step's LoRA slot per row
        (per token, packed), and the same already on the device (from the step's one copy in).
        `keep`: a packed step's columns whose logits are kept, or a number of each row's last
        columns ([B, keep, vocab]); None: each row's last."""
        lora, on_device = slots or (tuple(self._lora_slot(r) for r in rows), None)
        if on_device is None or self._rows.kernel != "triton":  # the grouped path groups rows from the host tuple
            installed = self._rows.using(lora, self._device)
        else:
            installed = self._rows.installed(on_device if any(lora) else None)
        with installed:
            return self._call(ids.to(self._device), positions.to(self._device), ctx, keep).float()

    def _model_step(self, ids: torch.Tensor, positions: torch.Tensor, ctx, lora: torch.Tensor | None):
        """A captured decode step: `lora` is the graphs' persistent [B] slot buffer."""
        with self._rows.installed(lora):
            return self._call(ids, positions, ctx)

    def _call(self, ids: torch.Tensor, positions: torch.Tensor, ctx, keep: torch.Tensor | int | None = None
              ) -> torch.Tensor:
        """[B, vocab] logits of each row's next token (the attention takes its mask from ctx);
        `keep` as in _forward."""
        out = self._model(input_ids=ids, position_ids=positions, use_cache=False,
                          logits_to_keep=1 if keep is None else keep, kv_step=ctx)
        if keep is None:
            return out.logits[:, -1, :]
        return out.logits if isinstance(keep, int) else out.logits[0]

    def _lora_slot(self, row: Row) -> int:
        if row.adapter.is_base:
            return 0
        slot = self._slot_of(row.adapter)
        self._await_copy(slot)
        return slot

    def _slot_of(self, adapter: AdapterRef) -> int:
        attached = self._slots.get(adapter)
        if attached is None:
            raise AdapterLoadFailed(adapter.key, "it was not attached when its batch step ran")
        return attached[0]

    def _results(self, rows: list[Row], logits: torch.Tensor,
                 prompt: tuple[torch.Tensor, list[tuple[int, int]]] | None = None) -> list[StepResult]:
        """`prompt`: the scores of prompt positions rows asked logprobs for, and per position
        (row index, the token it predicts), in each row's order. Guided rows' masks (runner/guided.py)
        come first, so penalties, the choice and the logprobs all see the grammar's tokens only."""
        sampled, masked, faults = self._guide.constrain(rows, logits)
        scores = self._processor(masked, sampled)
        tokens, finite = self._sample(sampled, scores), _finite(logits)
        if prompt is None and all(r.logprobs is None for r in rows):
            tokens, finite = _fetch(torch.stack((tokens, finite.long())))
            chosen, prompts = [None] * len(rows), [()] * len(rows)
        else:
            packed, layout = self._logprobs.pack(scores, tokens, rows, prompt)
            values = _fetch(torch.cat((tokens.double(), finite.double(), packed)))
            b = len(rows)
            tokens, finite = [int(t) for t in values[:b]], values[b:2 * b]
            chosen, prompts = self._logprobs.unpack(values[2 * b:], tokens, rows, layout)
        results = [StepResult(row.seq_id, token, logprob=lp, prompt_logprobs=tuple(pl)) if ok else StepResult(
                       row.seq_id, error=GenerationFailed("the model produced non-finite scores for this request",
                                                          reason="NON_FINITE_LOGITS", adapter_id=row.adapter.key))
                   for row, token, ok, lp, pl in zip(rows, tokens, finite, chosen, prompts, strict=True)]
        return [StepResult(r.seq_id, error=faults[r.seq_id]) if r.seq_id in faults else r for r in results]

    def _sample(self, rows: list[Row], scores: torch.Tensor) -> torch.Tensor:
        """[B] token ids, on the device (runner/sampling.py: no host round trip)."""
        return self._sampler(scores, [r.sampling for r in rows], [len(r.generated) for r in rows])

    async def detokenize(self, jobs: Sequence[TextJob]) -> list[Text | LoraServeError]:
        return await asyncio.get_running_loop().run_in_executor(self._detokenizer, self._texts, list(jobs))

    def _texts(self, jobs: list[TextJob]) -> list[Text | LoraServeError]:
        out: list[Text | LoraServeError] = []
        for job in jobs:
            try:
                out.append(self._detokenize(job))
            except Exception as exc:  # this row's tokens only: the others' texts go on
                log.warning("decoding the text of sequence %d failed: %s: %s", job.seq_id, type(exc).__name__, exc)
                out.append(GenerationFailed(f"decoding this request's text failed ({type(exc).__name__})"))
        return out

    def _detokenize(self, job: TextJob) -> Text:
        """Only the row's undecoded tail is decoded: O(1) tokens per row and step."""
        return Text(*decode_new(self._tokenizer, job.ids, 0, job.read))
