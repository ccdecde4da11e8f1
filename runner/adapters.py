"""The adapter slots: moving LoRA weights between disk, host RAM and the device's slot stacks.

scheduler/tiers.py decides; this only moves weights (the engine's TierEngine methods call it).
Reading (disk -> RAM, parsed and checked against the wrapped layers) runs on the loader threads,
overlapping compute; attach/demote/detach run on the engine thread. Each version is a separate
entry, so a new version never disturbs rows still running on the old one. A step reads an
adapter's slot (`ready_slot`) and nothing else from here: the rows themselves come from the
scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.registry.prepare import CONFIG, WEIGHTS  # safetensors only: pickle weights can run code
from loraserve.registry.weights import WeightsError, check_against_config, held_bytes, weight_facts
from loraserve.runner.lora import (LoRALinear, LoraWeights, RowSlots, UnsupportedAdapter, parse_peft, slot_bytes,
                         wrap_linear_layers)
from loraserve.runner.threads import side_executor
from loraserve.scheduler.errors import AdapterIncompatible, AdapterLoadFailed, LoraServeError
from loraserve.scheduler.types import AdapterRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attached:
    """An adapter in the device's stacks: its slot, and its rank in each module it adapts."""

    slot: int
    ranks: dict[str, int]


@dataclass(frozen=True)
class FileStamp:
    """A weights file as it was when its sha256 matched: replaced or rewritten, it differs."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    sha256: str


class AdapterSlots:
    """The wrapped layers' slot stacks and which adapter holds which slot, plus the adapters read
    into host RAM and not attached."""

    def __init__(self, max_loras: int, max_rank: int, vram_budget_bytes: int, load_threads: int):
        self.max_loras, self.max_rank, self.vram_budget_bytes = max_loras, max_rank, vram_budget_bytes
        self._loaders = side_executor(load_threads, "adapter-load")
        self.ram: dict[AdapterRef, LoraWeights] = {}
        """Read (fetch) or demoted, not attached: in the serving dtype, page-locked on cuda."""
        self.attached: dict[AdapterRef, Attached] = {}
        self.layers: dict[str, LoRALinear] = {}
        """Module path -> its wrapped layer, whose stacks hold every slot's weights for it."""
        self._unwrapped: frozenset[str] = frozenset()  # paths of linear layers LoRA is not applied to
        self._verified: dict[Path, FileStamp] = {}  # weights file -> the stamp it had when its sha256 matched
        self._free: list[int] = []
        self.slot_bytes = 0
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._copy_stream = None  # cuda: adapters are copied into their slots on a side stream
        self._copies: dict[int, object] = {}  # slot -> cuda event of its last copy, until a step awaits it

    # -- start-up -------------------------------------------------------------
    def install(self, model: torch.nn.Module, rows: RowSlots, targets: tuple[str, ...], device: torch.device,
                dtype: torch.dtype) -> None:
        """Wraps the model's target linear layers (every one but lm_head when `targets` is empty)
        and reserves their slot stacks."""
        self._device, self._dtype = device, dtype
        linears = {n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"}
        self.layers = wrap_linear_layers(model, rows, targets)
        self._unwrapped = frozenset(linears - set(self.layers))
        stray = sorted(set(targets) - self.lora_modules())
        if stray:
            log.warning("lora_target_modules %s name no linear layer of this model", stray)
        log.info("LoRA applies to %s: %d of %d linear layers (%s path)",
                 ", ".join(sorted(self.lora_modules())) or "nothing", len(self.layers), len(linears), rows.kernel)
        self._allocate()

    def _allocate(self) -> None:
        """Every wrapped layer's slot stacks at (slots + 1, max_rank), once: as many slots as
        max_loras allows and the VRAM budget holds. The VRAM tier then budgets whole slots."""
        self.slot_bytes = slot_bytes(self.layers.values(), self.max_rank, self._dtype)
        slots = self.max_loras
        if self.vram_budget_bytes and self.slot_bytes:
            slots = min(slots, self.vram_budget_bytes // self.slot_bytes)
        if slots < 1:
            raise ValueError(f"the VRAM budget holds no adapter: one slot of rank {self.max_rank} "
                             f"takes {self.slot_bytes / 2**20:.2f} MiB on this model")
        for layer in self.layers.values():
            layer.allocate(slots + 1, self.max_rank, self._device, self._dtype)
        self._free = list(range(slots, 0, -1))
        if self._device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self._device)

    def close(self) -> None:
        self._loaders.shutdown(wait=True)

    # -- what the model can take ------------------------------------------------
    def linear_modules(self) -> frozenset[str]:
        """Leaf names of the linear layers LoRA could be applied to (all but lm_head)."""
        return frozenset(path.rsplit(".", 1)[-1] for path in (*self.layers, *self._unwrapped))

    def lora_modules(self) -> frozenset[str]:
        """Leaf names of the linear layers LoRA is applied to (an adapter may adapt only these)."""
        return frozenset(path.rsplit(".", 1)[-1] for path in self.layers)

    # -- bytes ------------------------------------------------------------------
    def bytes_once_read(self, adapter: AdapterRef) -> int:
        """From the file's header: its tensors' elements in the serving dtype (a float32 file
        served in bfloat16 takes half its size in RAM)."""
        return held_bytes(Path(adapter.path) / WEIGHTS, self._dtype.itemsize)

    def stack_bytes(self) -> int:
        """Device bytes of the slot stacks, reserved once at start-up."""
        return sum(t.nbytes for layer in self.layers.values() for t in (layer.a, layer.b) if t is not None)

    @property
    def count(self) -> int:
        """Adapters attached at once: max_loras, fewer where the VRAM budget holds fewer."""
        return len(self._free) + len(self.attached)

    # -- disk -> RAM (loader threads) ---------------------------------------------
    async def fetch(self, adapter: AdapterRef) -> int:
        try:
            weights = await asyncio.get_running_loop().run_in_executor(self._loaders, self.read, adapter)
        except LoraServeError:
            raise
        except UnsupportedAdapter as exc:
            raise AdapterIncompatible(adapter.key, str(exc)) from exc
        except Exception as exc:  # a bad adapter fails its own requests only
            log.warning("reading adapter %s from %s failed: %s", adapter.key, adapter.path, exc)
            raise AdapterLoadFailed(adapter.key, f"{type(exc).__name__}: {exc}") from exc
        self.ram[adapter] = weights
        return weights.nbytes

    def read(self, adapter: AdapterRef) -> LoraWeights:
        from safetensors.torch import load as safetensors_load

        config = json.loads((Path(adapter.path) / CONFIG).read_text())
        path = Path(adapter.path) / WEIGHTS
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            blob = f.read()
        # A file already verified is not hashed again until it is replaced or rewritten (another
        # inode, size or mtime): re-reading an evicted adapter costs the read, not a sha256 too.
        stamp = FileStamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, adapter.sha256)
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
            self._check(adapter, module, a_t, b_t)
        # Page-locked host memory lets the attach copy run asynchronously on CUDA.
        return weights.to(torch.device("cpu"), self._dtype, pin=self._device.type == "cuda")

    def _check(self, adapter: AdapterRef, module: str, a_t: torch.Tensor, b_t: torch.Tensor) -> None:
        """One adapted module against the slots' rank and the wrapped layer it would join."""
        if a_t.shape[1] > self.max_rank:
            raise AdapterIncompatible(adapter.key, f"{module} has rank {a_t.shape[1]} in its weights; this "
                                      f"server's slots hold rank {self.max_rank} at most")
        layer = self.layers.get(module)
        if layer is None and module in self._unwrapped:
            leaf = module.rsplit(".", 1)[-1]
            raise AdapterIncompatible(adapter.key, f"it adapts {leaf} ({module}), which this server does not "
                                      f"apply LoRA to: restart it with --lora-target-modules including {leaf}")
        if layer is None:
            raise AdapterIncompatible(adapter.key, f"the base model has no linear layer {module!r}")
        if (a_t.shape[0], b_t.shape[1]) != (layer.in_features, layer.out_features):
            raise AdapterIncompatible(adapter.key, f"{module} is {a_t.shape[0]}->{b_t.shape[1]} in the adapter "
                                      f"but {layer.in_features}->{layer.out_features} in the base model")

    def drop(self, adapter: AdapterRef) -> None:
        self.ram.pop(adapter, None)

    # -- RAM <-> slots (engine thread) --------------------------------------------
    def attach(self, adapter: AdapterRef) -> None:
        weights = self.ram[adapter]
        slot = self._free.pop()  # the VRAM tier's budget is exactly the slots: one is free
        try:
            with self._copying(slot):
                for path, entry in weights.modules.items():
                    self.layers[path].write(slot, entry)
        except BaseException:  # the adapter stays in RAM and the slot free, as the books say
            with self._copying(slot):
                for path in weights.modules:
                    self.layers[path].write(slot, None)
            self._free.append(slot)
            raise
        del self.ram[adapter]
        self.attached[adapter] = Attached(slot, {path: a_t.shape[1] for path, (a_t, _) in weights.modules.items()})

    def demote(self, adapter: AdapterRef) -> None:
        attached = self.attached[adapter]
        self.await_copy(attached.slot)
        weights = LoraWeights({path: self.layers[path].read(attached.slot, r) for path, r in attached.ranks.items()})
        self.ram[adapter] = weights.to(torch.device("cpu"), self._dtype, pin=self._device.type == "cuda")
        self.detach(adapter)

    def detach(self, adapter: AdapterRef) -> None:
        attached = self.attached.pop(adapter)
        with self._copying(attached.slot):
            for path in attached.ranks:
                self.layers[path].write(attached.slot, None)
        self._free.append(attached.slot)

    @contextlib.contextmanager
    def _copying(self, slot: int):
        """On cuda, a slot's writes run on the copy stream, so attaching an adapter overlaps the
        steps of rows that do not use it; a step using the slot waits for them (await_copy).
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

    def await_copy(self, slot: int) -> None:
        event = self._copies.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self._device).wait_event(event)

    # -- what a step reads ----------------------------------------------------------
    def ready_slot(self, adapter: AdapterRef) -> int:
        """The slot a row of `adapter` reads (0: the base model), its copy ordered before the step."""
        if adapter.is_base:
            return 0
        attached = self.attached.get(adapter)
        if attached is None:
            raise AdapterLoadFailed(adapter.key, "it was not attached when its batch step ran")
        self.await_copy(attached.slot)
        return attached.slot
