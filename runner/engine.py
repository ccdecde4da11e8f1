"""The torch side: one base model (optionally bitsandbytes-quantized) plus LoRA adapters.

All torch work runs on one dedicated thread (TorchEngine's executor), so the
event loop never blocks and the model is never touched by two threads. The
batch lives here as a left-padded KV cache; each row carries its own adapter
(runner/lora.py gathers the rows' weights), so no global "active adapter"
exists to race on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from runner.kvcache import slack_cache
from runner.lora import LoRALinear, LoraWeights, RowSlots, UnsupportedAdapter, parse_peft, wrap_linear_layers
from runner.sampling import sample_next
from scheduler.engine import Row, StepResult
from scheduler.errors import AdapterIncompatible, AdapterLoadFailed, LoraServeError, OutOfMemory
from scheduler.types import AdapterRef

log = logging.getLogger(__name__)

# Only safetensors are read: pickle (.bin) weights can run code when loaded.
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


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


@dataclass
class _Batch:
    seq_ids: list[int]
    rows: list[Row]
    generated: list[list[int]]
    mask: torch.Tensor
    positions: torch.Tensor
    cache: object
    last: torch.Tensor
    generators: list[torch.Generator | None] = field(default_factory=list)


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


class TorchEngine:
    """Implements scheduler.engine.Engine over a HF causal LM."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loaders = ThreadPoolExecutor(max_workers=cfg.load_threads, thread_name_prefix="adapter-load")
        self._ram: dict[AdapterRef, LoraWeights] = {}
        self._slots: dict[AdapterRef, tuple[int, dict[str, int]]] = {}  # attached: slot, rank per module
        self._free_slots: list[int] = []
        self._capacity = 1  # slots every stacked layer holds (slot 0: no adapter)
        self._rows = RowSlots()
        self._layers: dict[str, LoRALinear] = {}
        self._module_names: frozenset[str] = frozenset()
        self._dtype = torch.float32
        self._tokenizer = None
        self._model = None
        self._device = torch.device("cpu")
        self._batch: _Batch | None = None
        self._eos: frozenset[int] = frozenset()

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        await self._run(self._load)

    def _load(self) -> None:
        self._tokenizer, self._model, self._device = load_model(self.cfg)
        self._dtype = resolve_dtype(self.cfg.dtype, self._device)
        self._module_names = frozenset(n.rsplit(".", 1)[-1] for n, _ in self._model.named_modules() if n)
        self._rows.keep_gathered = self._device.type == "cpu"
        self._layers = wrap_linear_layers(self._model, self._rows)
        eos = self._model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self._eos = frozenset(i for i in (*eos, self._tokenizer.eos_token_id) if i is not None)
        log.info("loaded base model %s on %s (quantization=%s)", self.cfg.model_path, self._device,
                 self.cfg.quantization)

    async def close(self) -> None:
        self._loaders.shutdown(wait=True)
        self._executor.shutdown(wait=True)

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
        """Most tokens (prompt + generated) one sequence may hold: the model's position limit."""
        return int(self._model.config.max_position_embeddings)

    def module_names(self) -> frozenset[str]:
        """Leaf names of the model's modules (what an adapter's target_modules may name)."""
        return self._module_names

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True)

    # -- adapters (scheduler.tiers.TierEngine) ------------------------------
    # scheduler/tiers.py decides; this only moves weights. Reading (disk -> RAM, parsed
    # and checked) runs on the loader threads, overlapping compute; attach/demote/detach
    # run on the engine thread. Each version is a separate entry, so a new version never
    # disturbs rows still running on the old one.
    def size_on_disk(self, adapter: AdapterRef) -> int:
        return (Path(adapter.path) / WEIGHTS).stat().st_size

    async def fetch(self, adapter: AdapterRef) -> int:
        try:
            weights = await asyncio.get_running_loop().run_in_executor(self._loaders, self._read, adapter)
        except LoraServeError:
            raise
        except UnsupportedAdapter as exc:
            raise AdapterIncompatible(adapter.id, str(exc)) from exc
        except Exception as exc:  # a bad adapter fails its own requests only
            log.warning("reading adapter %s from %s failed: %s", adapter.id, adapter.path, exc)
            raise AdapterLoadFailed(adapter.id, f"{type(exc).__name__}: {exc}") from exc
        self._ram[adapter] = weights
        return weights.nbytes

    def _read(self, adapter: AdapterRef) -> LoraWeights:
        from safetensors.torch import load as safetensors_load

        config = json.loads((Path(adapter.path) / CONFIG).read_text())
        blob = (Path(adapter.path) / WEIGHTS).read_bytes()
        if adapter.sha256 and hashlib.sha256(blob).hexdigest() != adapter.sha256:
            raise AdapterIncompatible(adapter.id, "its weights file does not match the sha256 in its passport",
                                      reason="WEIGHTS_HASH_MISMATCH")
        weights = parse_peft(config, safetensors_load(blob))
        for module, (a_t, b_t, _) in weights.modules.items():
            layer = self._layers.get(module)
            if layer is None:
                raise AdapterIncompatible(adapter.id, f"the base model has no linear layer {module!r}")
            if (a_t.shape[0], b_t.shape[1]) != (layer.in_features, layer.out_features):
                raise AdapterIncompatible(adapter.id, f"{module} is {a_t.shape[0]}->{b_t.shape[1]} in the adapter "
                                          f"but {layer.in_features}->{layer.out_features} in the base model")
        # Page-locked host memory lets the attach copy run asynchronously on CUDA.
        return weights.to(torch.device("cpu"), self._dtype, pin=self._device.type == "cuda")

    async def attach(self, adapter: AdapterRef) -> None:
        await self._run(self._attach, adapter)

    def _attach(self, adapter: AdapterRef) -> None:
        weights = self._ram.pop(adapter)
        slot = self._free_slots.pop() if self._free_slots else len(self._slots) + 1
        if slot >= self._capacity:  # double, so growing copies stay rare
            self._capacity = 2 * slot
            for layer in self._layers.values():
                layer.reserve(self._capacity, self._device, self._dtype)
        for path, entry in weights.modules.items():
            self._layers[path].write(slot, entry, self._capacity, self._device, self._dtype)
        self._slots[adapter] = (slot, {path: a_t.shape[1] for path, (a_t, _, _) in weights.modules.items()})

    async def demote(self, adapter: AdapterRef) -> None:
        await self._run(self._demote, adapter)

    def _demote(self, adapter: AdapterRef) -> None:
        slot, ranks = self._slots[adapter]
        weights = LoraWeights({path: self._layers[path].read(slot, r) for path, r in ranks.items()})
        self._detach(adapter)
        self._ram[adapter] = weights.to(torch.device("cpu"), self._dtype, pin=self._device.type == "cuda")

    async def detach(self, adapter: AdapterRef) -> None:
        await self._run(self._detach, adapter)

    def _detach(self, adapter: AdapterRef) -> None:
        slot, ranks = self._slots.pop(adapter)
        for path in ranks:
            self._layers[path].write(slot, None, self._capacity, self._device, self._dtype)
        self._free_slots.append(slot)

    def drop(self, adapter: AdapterRef) -> None:
        self._ram.pop(adapter, None)

    def stack_bytes(self) -> int:
        """Device bytes the attached adapters really occupy: the slot stacks are padded to the
        largest resident rank and grow by doubling, so this can exceed the VRAM tier's count
        (which budgets each adapter's own bytes) by up to about 2x."""
        return sum(t.nbytes for layer in self._layers.values() for t in (layer.a, layer.b) if t is not None)

    # -- batch ---------------------------------------------------------------
    # One running batch: a left-padded KV cache whose rows each carry their own adapter.
    # prefill() and decode() first drop the rows the scheduler no longer keeps; then prefill()
    # starts new rows and merges them in (continuous batching), decode() advances every row.
    async def prefill(self, rows: Sequence[Row], keep: Sequence[int]) -> list[StepResult]:
        return await self._run(self._out_of_memory_typed, self._prefill, list(rows), list(keep))

    async def decode(self, keep: Sequence[int]) -> list[StepResult]:
        return await self._run(self._out_of_memory_typed, self._decode, list(keep))

    def _out_of_memory_typed(self, step, *args):
        """torch's CUDA and CPU out-of-memory errors become OutOfMemory, which the scheduler
        answers by splitting the batch; what was allocated for the failed step is released."""
        try:
            return step(*args)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                raise
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"not enough {self._device.type} memory for this batch step") from exc

    async def release(self) -> None:
        await self._run(self._release)

    def _release(self) -> None:
        self._batch = None
        self._set_lora_rows([])

    def _set_lora_rows(self, adapters: list[AdapterRef]) -> None:
        """Point every wrapped layer at the slots of a batch whose row i uses adapters[i]."""
        slots = [0 if a.is_base else self._slots[a][0] for a in adapters]
        self._rows.index = torch.tensor(slots, device=self._device) if any(slots) else None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        # logits_to_keep=1: a prefill needs only the last position's logits, not [B, T, vocab].
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values

    @torch.inference_mode()
    def _prefill(self, rows: list[Row], keep: list[int]) -> list[StepResult]:
        self._keep_only(keep)
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        width = max(len(r.prompt_ids) for r in rows)
        # Left padding keeps every row's newest token in the last column.
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._set_lora_rows([r.adapter for r in rows])
        try:
            logits, cache = self._forward(ids, mask, positions, slack_cache())
        except BaseException:  # the running batch is untouched; point the layers back at its rows
            self._set_lora_rows([r.adapter for r in self._batch.rows] if self._batch else [])
            raise
        new = _Batch(seq_ids=[r.seq_id for r in rows], rows=rows, generated=[[] for _ in rows], mask=mask,
                     positions=positions[:, -1:], cache=cache, last=ids[:, -1:],
                     generators=[self._generator(r) for r in rows])
        results = self._sample(new, logits)
        self._batch = new if self._batch is None else _merge(self._batch, new)
        self._set_lora_rows([r.adapter for r in self._batch.rows])
        return results

    def _generator(self, row: Row) -> torch.Generator | None:
        if row.sampling.greedy:
            return None
        g = torch.Generator(device=self._device)
        g.manual_seed(row.sampling.seed if row.sampling.seed is not None else torch.seed())
        return g

    @torch.inference_mode()
    def _decode(self, keep: list[int]) -> list[StepResult]:
        self._keep_only(keep)
        b = self._batch
        b.mask = torch.cat([b.mask, torch.ones_like(b.mask[:, :1])], dim=1)
        b.positions = b.positions + 1
        logits, b.cache = self._forward(b.last, b.mask, b.positions, b.cache)
        return self._sample(b, logits)

    def _keep_only(self, keep: list[int]) -> None:
        """Drop the rows the scheduler no longer keeps: finished rows linger until here, and
        their adapters may have been detached since, so no forward may see them."""
        if self._batch is None or keep == self._batch.seq_ids:
            return
        if keep:
            self._select([self._batch.seq_ids.index(k) for k in keep])
        else:
            self._release()

    def _select(self, idx: list[int]) -> None:
        """Shrink the batch to rows `idx`: finished and cancelled rows stop costing compute."""
        b = self._batch
        index = torch.tensor(idx, device=self._device)
        b.cache.batch_select_indices(index)
        b.mask, b.positions, b.last = b.mask[index], b.positions[index], b.last[index]
        for name in ("seq_ids", "rows", "generated", "generators"):
            setattr(b, name, [getattr(b, name)[i] for i in idx])
        _trim(b)
        self._set_lora_rows([r.adapter for r in b.rows])

    def _sample(self, b: _Batch, logits: torch.Tensor) -> list[StepResult]:
        greedy = logits.argmax(dim=-1)  # one op for every greedy row
        chosen = greedy.clone()
        for i, row in enumerate(b.rows):
            if not row.sampling.greedy:
                chosen[i] = sample_next(logits[i], row.sampling, b.generators[i])
        b.last = chosen.unsqueeze(1)
        tokens = chosen.tolist()
        texts = self._tokenizer.batch_decode([g + [t] for g, t in zip(b.generated, tokens, strict=True)],
                                             skip_special_tokens=True)
        for generated, token in zip(b.generated, tokens, strict=True):
            generated.append(token)
        return [StepResult(sid, tok, text) for sid, tok, text in zip(b.seq_ids, tokens, texts, strict=True)]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _merge(running: _Batch, new: _Batch) -> _Batch:
    """Join `new` rows to the running batch: both left-padded to the longer cache, then stacked.
    Padded columns are masked out, and each row keeps its own positions."""
    width = max(running.mask.shape[1], new.mask.shape[1])
    for old_layer, new_layer in zip(running.cache.layers, new.cache.layers, strict=True):
        for name in ("keys", "values"):
            setattr(old_layer, name, torch.cat([_left_pad(getattr(old_layer, name), width, 2),
                                                _left_pad(getattr(new_layer, name), width, 2)]))
    running.mask = torch.cat([_left_pad(running.mask, width, 1), _left_pad(new.mask, width, 1)])
    running.positions = torch.cat([running.positions, new.positions])
    running.last = torch.cat([running.last, new.last])
    for name in ("seq_ids", "rows", "generated", "generators"):
        getattr(running, name).extend(getattr(new, name))
    return running


def _trim(b: _Batch) -> None:
    """Drop leading columns that every remaining row has masked out (left by departed rows)."""
    live = b.mask.any(dim=0).nonzero()
    first = int(live[0]) if len(live) else 0
    if first:
        b.mask = b.mask[:, first:]
        for layer in b.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
