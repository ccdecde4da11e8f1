"""Serving-time LoRA for mixed-adapter batches (BGMV-style).

Every linear layer of the base model is wrapped once at start-up. An attached adapter gets a
slot; each layer keeps its resident adapters' A^T and (scale x B^T) stacked by slot, zero-padded
to the largest resident rank. A batch's rows each name a slot (0 for none), and every forward
adds `(x @ a[slot]) @ b[slot]` for all rows with one index_select and two batched matmuls, so
a batch of many adapters costs about what a batch of one does (peft instead loops over the
adapters in the batch), and rows joining or leaving cost nothing. Weights are read from ordinary PEFT files; features this does not implement
(DoRA, embedding LoRA, modules_to_save, fan_in_fan_out, biases) are refused, never ignored.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


class UnsupportedAdapter(ValueError):
    pass


@dataclass
class LoraWeights:
    """One adapter: module path -> (A^T [in, r], scale x B^T [r, out]); the scale is folded into B
    when the file is read, so attaching is a plain copy."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())

    def to(self, device: torch.device, dtype: torch.dtype, pin: bool = False) -> LoraWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            if pin:  # converted straight into page-locked memory: one copy, not two
                return torch.empty(t.shape, dtype=dtype, pin_memory=True).copy_(t)
            return t.to(device=device, dtype=dtype, copy=True)
        return LoraWeights({k: (move(a), move(b)) for k, (a, b) in self.modules.items()})


def parse_peft(config: dict, tensors: dict[str, torch.Tensor]) -> LoraWeights:
    """PEFT's adapter_config.json + adapter_model.safetensors -> LoraWeights (on CPU)."""
    for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if config.get(flag):
            raise UnsupportedAdapter(f"{why} is not supported")
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"peft_type {config.get('peft_type')} is not LoRA")
    if config.get("modules_to_save"):
        raise UnsupportedAdapter("modules_to_save (fully trained extra modules) is not supported")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapter("LoRA biases are not supported")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if not match:
            raise UnsupportedAdapter(f"unsupported tensor {key!r}")
        parts.setdefault(match["module"], {})[match["which"]] = tensor
    alpha, patterns = float(config.get("lora_alpha", 8)), config.get("alpha_pattern") or {}
    modules = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise UnsupportedAdapter(f"{module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        r = a.shape[0]
        if b.shape[1] != r:
            raise UnsupportedAdapter(f"{module}: lora_A and lora_B ranks differ")
        module_alpha = next((float(v) for k, v in patterns.items() if module == k or module.endswith("." + k)),
                            alpha)
        scale = module_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        modules[module] = (a.t().contiguous(), (b.t() * scale).contiguous())
    return LoraWeights(modules)


def slot_bytes(layers, rank: int, dtype: torch.dtype) -> int:
    """Device bytes one adapter slot takes across `layers` (LoRALinear or nn.Linear) at `rank`."""
    return sum((m.in_features + m.out_features) * rank for m in layers) * dtype.itemsize


class RowSlots:
    """Shared by every wrapped layer: during one step's forward, the slot of each row's adapter.

    A step installs its rows' slots for its own forward only (`using`), so no later step can
    run with the slots of an earlier one, whatever raised in between. With `keep_gathered`,
    each layer keeps its rows' gathered weights while consecutive steps carry the same slots: on
    a CPU the per-step gather copy is most of LoRA's cost, and a batch's rows change far less
    often than once per step. On a GPU the copies are cheap but the kept [B, in, R] stacks would
    cost memory on the order of the model itself, so there they are gathered every step."""

    def __init__(self, keep_gathered: bool = False):
        self.keep_gathered = keep_gathered
        self.index: torch.Tensor | None = None
        """[B] slot per row while a forward runs; None outside one, or when no row has an adapter."""
        self.version = 0
        """Bumped whenever the slots or the rank change; a layer's kept gather is valid for one version."""
        self.rank = 1
        """The largest rank attached (columns of the stacks that forwards read)."""
        self._slots: tuple[tuple[int, ...], int | None] = ((), None)
        self._tensor: torch.Tensor | None = None

    @contextlib.contextmanager
    def using(self, slots: tuple[int, ...], device: torch.device, rank: int | None = None):
        """`slots` for one forward, reading `rank` columns (None: the largest attached)."""
        if (slots, rank) != self._slots:
            self._slots, self.version = (slots, rank), self.version + 1
            self._tensor = torch.tensor(slots, device=device) if any(slots) else None
        with self.installed(self._tensor, rank):
            yield

    @contextlib.contextmanager
    def installed(self, index: torch.Tensor | None, rank: int | None = None):
        """`index` ([B] slots, or None for no adapter) for one forward, as it is: a captured
        decode step passes its persistent buffer, whose contents change between replays, and the
        rank its bucket reads (at least the largest attached)."""
        kept_rank = self.rank
        self.index, self.rank = index, rank or self.rank
        try:
            yield
        finally:
            self.index, self.rank = None, kept_rank


class LoRALinear(nn.Module):
    """A base linear layer (plain, or bitsandbytes-quantized) plus every adapter slot's weights
    for it: a [S, in, R] and b [S, R, out], allocated once (S = max_loras + 1, R = max_lora_rank;
    the scale folded into b; slot 0 all zero for rows without an adapter). An adapter is copied
    into its slot in place, so attaching and detaching never reallocate and the device memory
    is what start-up reserved. A forward picks each row's slot with one index_select over the
    first `RowSlots.rank` columns (the largest attached rank), so rank-8 adapters do not pay
    for rank-64 room."""

    def __init__(self, base: nn.Module, rows: RowSlots):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self._rows = rows
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (rows version, a, b)

    def allocate(self, slots: int, rank: int, device, dtype) -> None:
        self.a = torch.zeros(slots, self.in_features, rank, device=device, dtype=dtype)
        self.b = torch.zeros(slots, rank, self.out_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        index = self._rows.index
        if index is None or self.a is None:
            return y
        a, b = self._gather(index)
        if x.dtype == a.dtype == y.dtype:
            return torch.baddbmm(y, torch.bmm(x, a), b)
        return y + torch.bmm(torch.bmm(x.to(a.dtype), a), b).to(y.dtype)

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, in, r] and [B, r, out]: each row's adapter weights (r: the largest attached rank)."""
        kept = self._gathered
        if kept is not None and kept[0] == self._rows.version:
            return kept[1], kept[2]
        r = self._rows.rank
        a, b = self.a[:, :, :r].index_select(0, index), self.b[:, :r, :].index_select(0, index)
        self._gathered = (self._rows.version, a, b) if self._rows.keep_gathered else None
        return a, b

    def write(self, slot: int, entry: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put one adapter's (A^T, scale x B^T) for this layer into `slot` (None clears it). From
        page-locked host memory the copies are asynchronous on the current stream."""
        self._gathered = None
        r = 0 if entry is None else entry[0].shape[1]
        if entry is not None:
            self.a[slot, :, :r].copy_(entry[0], non_blocking=True)
            self.b[slot, :r, :].copy_(entry[1], non_blocking=True)
        self.a[slot, :, r:].zero_()
        self.b[slot, r:, :].zero_()

    def read(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A^T, scale x B^T) held in `slot`, copied to the CPU."""
        return self.a[slot, :, :rank].to("cpu", copy=True), self.b[slot, :rank, :].to("cpu", copy=True)


def wrap_linear_layers(model: nn.Module, rows: RowSlots,
                       skip: tuple[str, ...] = ("lm_head",)) -> dict[str, LoRALinear]:
    """Wrap every nn.Linear (bitsandbytes layers subclass it) except `skip`; returns them by module path."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip]
    wrapped = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, rows)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
