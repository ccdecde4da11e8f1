"""Serving-time LoRA for mixed-adapter batches (Punica/S-LoRA style: SGMV on CPU, BGMV on CUDA).

Only the linear layers that served adapters target are wrapped (the engine's
`lora_target_modules`; all of them when none is given), once, at start-up. An attached adapter
gets a slot; each wrapped layer keeps its resident adapters' A^T and (scale x B^T) stacked by
slot, with room for the largest rank, and a per-slot rank table (0 where the slot's adapter does
not adapt this layer, and for slot 0, the rows without an adapter). A batch's rows each name a
slot, and every forward adds each row's `(x @ a[slot, :, :rank]) @ b[slot, :rank, :]`, reading
the stacks in place (no per-row copy of the weights):

* on CUDA, two Triton kernels over the rows' slot indices and the rank table
  (runner/lora_kernels.py; BGMV: each row reads its own adapter's weights, at its own rank; rows
  of slot 0 return at once), with fixed shapes and no host syncs, so CUDA graphs capture them;
* elsewhere, grouped by slot (SGMV-like): the adapter rows sorted by slot (a copy of their
  activations, none when they are in order already), one pair of matmuls per adapter present on
  views of its slot at its own rank, and one scatter-add into the rows; rows of slot 0 cost
  nothing here, and a layer no present adapter adapts costs nothing at all.

A batch without any adapter row skips LoRA altogether. Weights are read from ordinary PEFT
files; features this does not implement (DoRA, embedding LoRA, modules_to_save, fan_in_fan_out,
biases) are refused, never ignored.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight")

KERNELS = ("grouped", "triton")


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


@dataclass(frozen=True)
class Groups:
    """One forward's adapter rows, grouped by slot for the grouped path; worked out once per
    forward, on the host, for every layer."""

    slots: tuple[int, ...]
    """Each group's slot, ascending."""
    sizes: tuple[int, ...]
    """Each group's rows."""
    order: torch.Tensor | None
    """The adapter rows (slot 0 left out) sorted by slot; None when that is every row as it is."""


def group_rows(slots: tuple[int, ...] | list[int], device: torch.device) -> Groups:
    """The rows of each adapter slot present in `slots` (slot 0, no adapter, is left out)."""
    order = sorted((i for i, slot in enumerate(slots) if slot), key=lambda i: slots[i])
    counts = Counter(slots[i] for i in order)
    present = tuple(sorted(counts))
    as_is = order == list(range(len(slots)))
    return Groups(present, tuple(counts[s] for s in present), None if as_is else torch.tensor(order, device=device))


class RowSlots:
    """Shared by every wrapped layer: during one step's forward, the slot of each row's adapter.

    A step installs its rows' slots for its own forward only (`using`, `installed`), so no later
    step can run with the slots of an earlier one, whatever raised in between. `kernel` says how
    the layers apply them: "triton" (CUDA: the [B] slot tensor goes to the kernels) or "grouped"
    (elsewhere: the rows grouped by slot, worked out once per forward for every layer)."""

    def __init__(self, kernel: str = "grouped"):
        if kernel not in KERNELS:
            raise ValueError(f"LoRA kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        self.kernel = kernel
        self.add_lora = None
        """The kernels' entry point (runner/lora_kernels.py, which imports triton) when kernel is "triton"."""
        if kernel == "triton":
            from runner.lora_kernels import add_lora

            self.add_lora = add_lora
        self.index: torch.Tensor | None = None
        """[B] slot per row while a forward runs; None outside one, or when no row has an adapter."""
        self._groups: Groups | None = None
        self._last: tuple[tuple[int, ...], torch.Tensor | None, Groups | None] = ((), None, None)

    @contextlib.contextmanager
    def using(self, slots: tuple[int, ...], device: torch.device):
        """`slots` (one per row, 0 for none) for one forward."""
        if slots != self._last[0]:  # consecutive steps mostly carry the same rows
            index = torch.tensor(slots, device=device) if any(slots) else None
            groups = group_rows(slots, device) if index is not None and self.kernel == "grouped" else None
            self._last = (slots, index, groups)
        with self._installed(self._last[1], self._last[2]):
            yield

    @contextlib.contextmanager
    def installed(self, index: torch.Tensor | None):
        """`index` ([B] slots, or None for no adapter) for one forward, as it is: a captured decode
        step passes its persistent buffer, whose contents change between replays."""
        with self._installed(index, None):
            yield

    @contextlib.contextmanager
    def _installed(self, index: torch.Tensor | None, groups: Groups | None):
        self.index, self._groups = index, groups
        try:
            yield
        finally:
            self.index, self._groups = None, None

    @property
    def groups(self) -> Groups:
        """The grouped path's rows by slot (from the installed index when only it is known: the
        static-buffer decode step off CUDA, where reading it back costs no sync)."""
        if self._groups is None:
            self._groups = group_rows(self.index.tolist(), self.index.device)
        return self._groups


class LoRALinear(nn.Module):
    """A base linear layer (plain, or bitsandbytes-quantized) plus every adapter slot's weights
    for it: a [S, in, R] and b [S, R, out], allocated once (S = max_loras + 1, R = max_lora_rank;
    the scale folded into b; slot 0 all zero for rows without an adapter), and `ranks`, each
    slot's rank here (0: its adapter does not adapt this layer). An adapter is copied into its
    slot in place, so attaching and detaching never reallocate and the device memory is what
    start-up reserved. A forward reads each row's slot at that slot's own rank, in place."""

    def __init__(self, base: nn.Module, rows: RowSlots):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self._rows = rows
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.ranks: list[int] = []
        """Per slot, on the host (the grouped path)."""
        self.rank_table: torch.Tensor | None = None
        """The same per slot, [S] int32 on the device (the kernels)."""
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (a, b) at its rank

    def allocate(self, slots: int, rank: int, device, dtype) -> None:
        self.a = torch.zeros(slots, self.in_features, rank, device=device, dtype=dtype)
        self.b = torch.zeros(slots, rank, self.out_features, device=device, dtype=dtype)
        self.ranks = [0] * slots
        self.rank_table = torch.zeros(slots, dtype=torch.int32, device=device)
        self._views = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        index = self._rows.index
        if index is None or self.a is None:
            return y
        if not y.is_contiguous():
            y = y.contiguous()
        if self._rows.add_lora is not None:
            self._rows.add_lora(y, x, self.a, self.b, index, self.rank_table)
            return y
        return self._grouped(x, y, self._rows.groups)

    def _grouped(self, x: torch.Tensor, y: torch.Tensor, groups: Groups) -> torch.Tensor:
        """y += each present adapter's delta on its own rows, x [B, in] or [B, T, in] (every
        column of a row uses the row's slot): the adapter rows sorted by slot (one copy of their
        activations, unless they are every row in order already), then per adapter one matmul
        pair on views of its slot at its rank, and one scatter-add back."""
        ranks = self.ranks
        on = [ranks[slot] > 0 for slot in groups.slots]
        if not any(on):  # no adapter present adapts this layer
            return y
        rows = x.shape[0]
        width = x.numel() // (rows * self.in_features)  # columns per row
        sizes = [n * width for n in groups.sizes]
        views, same = self._views, x.dtype == self.a.dtype == y.dtype
        if groups.order is None:  # the rows are their groups, in order: add in place, no copies
            ys = y.view(-1, self.out_features).split(sizes)
            for slot, part, out, applies in zip(groups.slots, x.reshape(-1, self.in_features).split(sizes), ys, on):
                if applies:
                    a, b = views[slot]
                    if same:
                        out.addmm_(part @ a, b)
                    else:
                        out.add_((part.to(a.dtype) @ a @ b).to(y.dtype))
            return y
        xs = x.index_select(0, groups.order).view(-1, self.in_features)
        if xs.dtype != self.a.dtype:
            xs = xs.to(self.a.dtype)
        delta = (torch.empty if all(on) else torch.zeros)((xs.shape[0], self.out_features), dtype=xs.dtype,
                                                         device=xs.device)
        for slot, part, out, applies in zip(groups.slots, xs.split(sizes), delta.split(sizes), on):
            if applies:
                a, b = views[slot]
                torch.mm(part @ a, b, out=out)
        y.view(rows, width, self.out_features).index_add_(
            0, groups.order, delta.view(-1, width, self.out_features).to(y.dtype))
        return y

    def write(self, slot: int, entry: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put one adapter's (A^T, scale x B^T) for this layer into `slot` (None clears it). From
        page-locked host memory the copies are asynchronous on the current stream."""
        r = 0 if entry is None else entry[0].shape[1]
        if entry is not None:
            self.a[slot, :, :r].copy_(entry[0], non_blocking=True)
            self.b[slot, :r, :].copy_(entry[1], non_blocking=True)
        self.a[slot, :, r:].zero_()
        self.b[slot, r:, :].zero_()
        self.ranks[slot] = r
        self.rank_table[slot] = r  # on the same stream as the weights it describes
        if r:
            self._views[slot] = (self.a[slot, :, :r], self.b[slot, :r, :])
        else:
            self._views.pop(slot, None)

    def read(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A^T, scale x B^T) held in `slot`, copied to the CPU."""
        return self.a[slot, :, :rank].to("cpu", copy=True), self.b[slot, :rank, :].to("cpu", copy=True)


def wrap_linear_layers(model: nn.Module, rows: RowSlots, targets: tuple[str, ...] | frozenset[str] = (),
                       skip: tuple[str, ...] = ("lm_head",)) -> dict[str, LoRALinear]:
    """Wrap the nn.Linear layers (bitsandbytes layers subclass it) whose leaf name is in `targets`
    (every one when it is empty), except `skip`; returns them by module path."""
    wanted = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and (leaf := name.rsplit(".", 1)[-1]) not in skip
              and (not targets or leaf in targets)]
    wrapped = {}
    for name, module in wanted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, rows)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
