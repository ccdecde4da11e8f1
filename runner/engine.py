"""The torch side: one base model (optionally bitsandbytes-quantized) plus PEFT adapters.

All torch work runs on one dedicated thread (TorchEngine's executor), so the
event loop never blocks and the model is never touched by two threads. The
batch lives here as a left-padded KV cache; each row names its own adapter
through peft's `adapter_names`, so no global "active adapter" exists to race on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from runner.sampling import sample_next
from scheduler.engine import Row, StepResult
from scheduler.errors import AdapterIncompatible, AdapterLoadFailed, LoraServeError
from scheduler.types import AdapterRef

log = logging.getLogger(__name__)

# peft's name for "no adapter" in a mixed batch.
PEFT_BASE = "__base__"
# Only safetensors are read: pickle (.bin) weights can run code when loaded.
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    quantization: str = "none"
    """none | nf4 | int8 (bitsandbytes)."""
    device: str = "auto"
    """auto picks cuda when present, else cpu."""
    load_threads: int = 2
    """Threads reading adapters from disk (the scheduler's limiter caps concurrent loads)."""


@dataclass
class _Batch:
    seq_ids: list[int]
    adapter_names: list[str]
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


def load_model(cfg: EngineConfig):
    """Tokenizer and base model from a HF directory (never a hub download)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = resolve_device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
        self._ram: dict[AdapterRef, tuple] = {}
        self._tokenizer = None
        self._model = None
        self._device = torch.device("cpu")
        self._batch: _Batch | None = None
        self._eos: frozenset[int] = frozenset()

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        await self._run(self._load)

    def _load(self) -> None:
        import peft  # noqa: F401  (imported now so the first adapter load does not pay for it)

        self._tokenizer, self._model, self._device = load_model(self.cfg)
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

    def module_names(self) -> frozenset[str]:
        """Leaf names of the model's modules (what an adapter's target_modules may name)."""
        return frozenset(name.rsplit(".", 1)[-1] for name, _ in self._model.named_modules() if name)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True)

    # -- adapters (scheduler.tiers.TierEngine) ------------------------------
    # scheduler/tiers.py decides; this only moves weights. Reading (disk -> RAM)
    # runs on the loader threads, overlapping compute; attach/demote/detach run on
    # the engine thread because they change the module tree the forward pass walks.
    # Each version is its own peft adapter, so a new version never disturbs a
    # batch still running on the old one.
    @staticmethod
    def peft_name(adapter: AdapterRef) -> str:
        return PEFT_BASE if adapter.is_base else f"{adapter.id}__v{adapter.version}"

    def size_on_disk(self, adapter: AdapterRef) -> int:
        return (Path(adapter.path) / WEIGHTS).stat().st_size

    async def fetch(self, adapter: AdapterRef) -> int:
        try:
            config, weights = await asyncio.get_running_loop().run_in_executor(self._loaders, self._read, adapter)
        except LoraServeError:
            raise
        except Exception as exc:  # a bad adapter fails its own requests only
            log.warning("reading adapter %s from %s failed: %s", adapter.id, adapter.path, exc)
            raise AdapterLoadFailed(adapter.id, f"{type(exc).__name__}: {exc}") from exc
        self._ram[adapter] = (config, weights)
        return sum(t.nbytes for t in weights.values())

    def _read(self, adapter: AdapterRef):
        from peft import PeftConfig
        from safetensors.torch import load as safetensors_load

        config = PeftConfig.from_pretrained(adapter.path)
        config.inference_mode = True
        blob = (Path(adapter.path) / WEIGHTS).read_bytes()
        if adapter.sha256 and hashlib.sha256(blob).hexdigest() != adapter.sha256:
            raise AdapterIncompatible(adapter.id, "its weights file does not match the sha256 in its passport",
                                      reason="WEIGHTS_HASH_MISMATCH")
        weights = safetensors_load(blob)
        if self._device.type == "cuda":  # page-locked host memory makes the attach copy async-capable
            weights = {k: v.pin_memory() for k, v in weights.items()}
        return config, weights

    async def attach(self, adapter: AdapterRef) -> None:
        try:
            await self._run(self._attach, adapter)
        except Exception as exc:
            log.warning("attaching adapter %s failed: %s", adapter.id, exc)
            raise AdapterLoadFailed(adapter.id, f"{type(exc).__name__}: {exc}") from exc

    def _attach(self, adapter: AdapterRef) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        config, weights = self._ram.pop(adapter)
        name = self.peft_name(adapter)
        if isinstance(self._model, PeftModel):
            self._model.add_adapter(name, config)
        else:
            self._model = PeftModel(self._model, config, adapter_name=name)
        self._model.eval()
        result = set_peft_model_state_dict(self._model, weights, adapter_name=name)
        missing = [k for k in result.missing_keys if name in k and "lora_" in k]
        if missing:
            self._remove(name)
            raise ValueError(f"weights file lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")

    async def demote(self, adapter: AdapterRef) -> None:
        await self._run(self._demote, adapter)

    def _demote(self, adapter: AdapterRef) -> None:
        from peft import get_peft_model_state_dict

        name = self.peft_name(adapter)
        weights = {k: v.detach().to("cpu", copy=True)
                   for k, v in get_peft_model_state_dict(self._model, adapter_name=name).items()}
        config = self._model.peft_config[name]
        self._remove(name)
        self._ram[adapter] = (config, weights)

    async def detach(self, adapter: AdapterRef) -> None:
        await self._run(self._remove, self.peft_name(adapter))

    def _remove(self, name: str) -> None:
        # peft cannot delete its last adapter (its active adapter would dangle), so the
        # last one goes by unwrapping back to the plain base model.
        if len(self._model.peft_config) == 1:
            self._model = self._model.unload()
            self._model.eval()
        else:
            with warnings.catch_warnings():
                # "Adapter X was active which is now deleted": rows name their adapters, so
                # peft's notion of an active adapter is never used here.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self._model.delete_adapter(name)

    def drop(self, adapter: AdapterRef) -> None:
        self._ram.pop(adapter, None)

    # -- batch ---------------------------------------------------------------
    async def prefill(self, rows: Sequence[Row]) -> list[StepResult]:
        return await self._run(self._prefill, list(rows))

    async def decode(self, keep: Sequence[int]) -> list[StepResult]:
        return await self._run(self._decode, list(keep))

    async def release(self) -> None:
        self._batch = None

    def _forward(self, batch_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 adapter_names: list[str]):
        from peft import PeftModel

        kwargs = {}
        if isinstance(self._model, PeftModel):
            kwargs["adapter_names"] = adapter_names
        out = self._model(input_ids=batch_ids, attention_mask=mask, position_ids=positions,
                          past_key_values=cache, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float(), out.past_key_values

    @torch.inference_mode()
    def _prefill(self, rows: list[Row]) -> list[StepResult]:
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
        names = [self.peft_name(r.adapter) for r in rows]
        logits, cache = self._forward(ids, mask, positions, None, names)
        generators = [self._generator(r) for r in rows]
        self._batch = _Batch(
            seq_ids=[r.seq_id for r in rows], adapter_names=names, rows=rows,
            generated=[[] for _ in rows], mask=mask, positions=positions[:, -1:], cache=cache,
            last=ids[:, -1:], generators=generators)
        return self._sample(logits)

    def _generator(self, row: Row) -> torch.Generator | None:
        if row.sampling.greedy:
            return None
        g = torch.Generator(device=self._device)
        g.manual_seed(row.sampling.seed if row.sampling.seed is not None else torch.seed())
        return g

    @torch.inference_mode()
    def _decode(self, keep: list[int]) -> list[StepResult]:
        b = self._batch
        if keep != b.seq_ids:
            self._select([b.seq_ids.index(k) for k in keep])
        b.mask = torch.cat([b.mask, torch.ones_like(b.mask[:, :1])], dim=1)
        b.positions = b.positions + 1
        logits, b.cache = self._forward(b.last, b.mask, b.positions, b.cache, b.adapter_names)
        return self._sample(logits)

    def _select(self, idx: list[int]) -> None:
        """Shrink the batch to rows `idx`: finished and cancelled rows stop costing compute."""
        b = self._batch
        index = torch.tensor(idx, device=self._device)
        b.cache.batch_select_indices(index)
        b.mask, b.positions, b.last = b.mask[index], b.positions[index], b.last[index]
        for name in ("seq_ids", "adapter_names", "rows", "generated", "generators"):
            setattr(b, name, [getattr(b, name)[i] for i in idx])

    def _sample(self, logits: torch.Tensor) -> list[StepResult]:
        b = self._batch
        tokens = [sample_next(logits[i], row.sampling, b.generators[i]) for i, row in enumerate(b.rows)]
        b.last = torch.tensor(tokens, device=self._device).unsqueeze(1)
        results = []
        for i, token in enumerate(tokens):
            b.generated[i].append(token)
            text = self._tokenizer.decode(b.generated[i], skip_special_tokens=True)
            results.append(StepResult(b.seq_ids[i], token, text))
        return results
