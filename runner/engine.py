"""The torch side: one base model (optionally bitsandbytes-quantized) plus LoRA adapters.

All torch work runs on one dedicated thread (TorchEngine's executor), so the event loop never
blocks and the model is never touched by two threads. TorchEngine loads (runner/loading.py
builds the model and the KV pool, runner/adapters.py wraps its layers and owns the adapter
slots), then steps (runner/steps.py). No batch lives here: each step gets its rows from the
scheduler (their KV blocks in the paged runner/kvpool.py, and their adapters, whose slots
runner/lora.py reads in place per row), so there is neither a cache to reconcile nor a global
"active adapter" to race on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from loraserve.runner import determinism
from loraserve.runner.adapters import AdapterSlots
from loraserve.runner.config import EngineConfig
from loraserve.runner.detok import decode_new
from loraserve.runner.graphs import CaptureFailed, DecodeGraphs
from loraserve.runner.guided import Guide
from loraserve.runner.kvpool import ATTENTION
from loraserve.runner.loading import (allocate_pool, attention_kernel, load_model, lora_kernel,
                                     refuse_unsupported_attention, resolve_dtype)
from loraserve.runner.logprobs import Logprobs
from loraserve.runner.lora import RowSlots
from loraserve.runner.sampling import Processor, Sampler
from loraserve.runner.staging import Staging
from loraserve.runner.steps import Steps
from loraserve.runner.threads import engine_executor, side_executor
from loraserve.scheduler.engine import Row, StepResult, Text, TextJob
from loraserve.scheduler.errors import GenerationFailed, LoraServeError
from loraserve.scheduler.types import AdapterRef, ResponseFormat

log = logging.getLogger(__name__)


class TorchEngine(Steps):
    """Implements scheduler.engine.Engine over a HF causal LM."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._executor = engine_executor()
        # Text is decoded here while the engine thread runs the next step (Engine.detokenize).
        self._detokenizer = side_executor(1, "detokenize")
        self._adapters = AdapterSlots(cfg.max_loras, cfg.max_lora_rank, cfg.vram_budget_bytes, cfg.load_threads)
        self._rows = RowSlots()
        self._module_names: frozenset[str] = frozenset()
        self._dtype = torch.float32
        self._tokenizer = None
        self._model = None
        self._device = torch.device("cpu")
        self._pool = None
        self._kernel = "reference"
        self._graphs = None
        self._inputs = None
        self._prefill_inputs = None
        self._sampler = None
        self._processor = None
        self._logprobs = None
        self._pad = 0
        self._eos: frozenset[int] = frozenset()
        self._holds_determinism = False
        self._guide = None

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
        self._kernel = attention_kernel(self.cfg.attention, self._device, self.cfg.kv_block_size)
        # A captured step has fixed shapes: only the block mask reads a row's length without a host int.
        capture = self._device.type == "cuda" and self._kernel == "flex" and self.cfg.decode_graphs == "auto"
        # FlexAttention is compiled per shape: uncaptured decode takes the graphs' row buckets too.
        graphs = self.cfg.decode_graphs == "buffers" or capture or self._kernel == "flex"
        self._rows = RowSlots(lora_kernel(self._device))
        self._adapters.install(self._model, self._rows, tuple(self.cfg.lora_target_modules), self._device,
                               self._dtype)
        self._pool = allocate_pool(self.cfg, self._model, self._device, self._dtype)
        refuse_unsupported_attention(self._model.config, self._pool.geometry.max_len)
        self._model.set_attn_implementation(ATTENTION)
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

    async def close(self) -> None:
        self._adapters.close()
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
        return self._adapters.linear_modules()

    def lora_modules(self) -> frozenset[str]:
        """Leaf names of the linear layers LoRA is applied to (an adapter may adapt only these)."""
        return self._adapters.lora_modules()

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

    # -- adapters (scheduler.tiers.TierEngine) ------------------------------
    # scheduler/tiers.py decides; runner/adapters.py moves the weights: reads on its loader
    # threads, attach/demote/detach on the engine thread.
    def bytes_once_read(self, adapter: AdapterRef) -> int:
        return self._adapters.bytes_once_read(adapter)

    async def fetch(self, adapter: AdapterRef) -> int:
        return await self._adapters.fetch(adapter)

    async def attach(self, adapter: AdapterRef) -> None:
        await self._run(self._adapters.attach, adapter)

    async def demote(self, adapter: AdapterRef) -> None:
        await self._run(self._adapters.demote, adapter)

    async def detach(self, adapter: AdapterRef) -> None:
        await self._run(self._adapters.detach, adapter)

    def drop(self, adapter: AdapterRef) -> None:
        self._adapters.drop(adapter)

    def stack_bytes(self) -> int:
        """Device bytes of the adapter slot stacks, reserved once at start-up."""
        return self._adapters.stack_bytes()

    def attached_bytes(self, adapter: AdapterRef) -> int:
        """What an attached adapter occupies on the device: one whole slot, whatever its rank."""
        return self._adapters.slot_bytes

    @property
    def lora_slots(self) -> int:
        """Adapters attached at once: max_loras, fewer where the VRAM budget holds fewer."""
        return self._adapters.count

    @property
    def lora_budget_bytes(self) -> int:
        """The VRAM tier's budget: the reserved slots, each counted whole."""
        return self.lora_slots * self._adapters.slot_bytes

    # -- steps (runner/steps.py) on the engine thread ---------------------------
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
