"""Serving-time LoRA for mixed-adapter batches (Punica/S-LoRA style: SGMV on CPU, BGMV on CUDA).

Only the linear layers that served adapters target are wrapped (the engine's
`lora_target_modules`; all of them when none is given), once, at start-up. An attached adapter
gets a slot; each wrapped layer keeps its resident adapters' A^T and (scale x B^T) stacked by
slot, with room for the largest rank, and a per-slot rank table (0 where the slot's adapter does
not adapt this layer, and for slot 0, the rows without an adapter). A batch's rows each name a
slot, and every forward adds each row's `(x @ a[slot, :, :rank]) @ b[slot, :rank, :]`:

* on CUDA, two Triton kernels over the rows' slot indices and the rank table, reading the stacks
  in place, with no copy of the weights (runner/lora_kernels.py; BGMV: each row reads its own
  adapter's weights, at its own rank; rows of slot 0 return at once), with fixed shapes and no
  host syncs, so CUDA graphs capture them;
* elsewhere, grouped by slot (SGMV-like): each adapter's rows packed into chunks (a copy of
  their activations, worked out once per forward), each chunk's A and B copied once, and one pair
  of batched matmuls over every adapter present, then one index-add into the rows: a fixed
  handful of operations per layer however many adapters the batch mixes; rows of slot 0 cost
  nothing here, and a layer no present adapter adapts costs nothing at all. When every row has
  an adapter and the chunks are single rows (few rows share an adapter) or runs of one adapter's
  rows already in order (a batch of one adapter), the rows stay in place: no copy of
  activations, the delta added by one batched multiply-add. Each layer keeps its chunks' A and
  B, gathered from the stacks, for as long as the batch's slots repeat (decode steps mostly carry
  the same rows) and no slot of that layer is written: at most as many chunks as the stacks
  have slots, so never more memory than the stacks themselves.

A batch without any adapter row skips LoRA altogether. Weights are read from ordinary PEFT
files; features this does not implement (DoRA, embedding LoRA, modules_to_save, fan_in_fan_out,
biases) are refused, never ignored.
"""

from __future__ import annotations

import contextlib
import math
import re
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


_COPY_ROWS = 2
"""What copying one chunk's A and B costs, in rows of LoRA compute (both move in x r + r x out
elements): the price of one more chunk against that of a padded row."""


def _chunk_rows(sizes: tuple[int, ...]) -> int:
    """Rows per chunk: a group of s rows takes ceil(s / m) chunks of m rows (the last one padded);
    the m that costs least in padded rows plus weight copies, over powers of two."""
    largest, best = max(sizes), (math.inf, 1)
    m = 1
    while True:
        cost = sum(-(-s // m) for s in sizes) * (m + _COPY_ROWS)
        best = min(best, (cost, m))
        if m >= largest:
            return best[1]
        m *= 2


@dataclass(frozen=True)
class Groups:
    """One forward's adapter rows packed for the grouped path, worked out once per forward on the
    host for every layer: each adapter's rows (slot 0 left out) cut into chunks of `chunk` rows,
    the last padded with its first row (whose padded output is never read back), so every layer
    computes all adapters present in one pair of batched matmuls, reading each adapter's weights
    once per chunk, never once per row of a shared adapter."""

    count: int
    """Rows in the forward (a packed step's rows are its tokens)."""
    slots: tuple[int, ...]
    """The slots present, ascending."""
    sizes: tuple[int, ...]
    """Each present slot's rows."""
    chunk: int
    chunk_slots: torch.Tensor
    """[P] each chunk's slot."""
    gather: torch.Tensor | None
    """[P x chunk] the row at each packed position; None when the rows already sit in their chunks
    (every row has an adapter, and chunks are single rows or runs of one adapter's rows)."""
    rows: torch.Tensor | None
    """[n] the adapter rows, in packed order (None with gather)."""
    back: torch.Tensor | None
    """[n] each of those rows' packed position; None when chunks are single rows (it is 0..n-1)."""


def group_rows(slots: tuple[int, ...] | list[int], device: torch.device) -> Groups:
    """The rows of each adapter slot present in `slots` (slot 0, no adapter, is left out), packed."""
    members: dict[int, list[int]] = {}
    for i, slot in enumerate(slots):
        if slot:
            members.setdefault(slot, []).append(i)
    present = tuple(sorted(members))
    sizes = tuple(len(members[s]) for s in present)
    m = _chunk_rows(sizes)
    if sum(sizes) == len(slots) and (m == 1 or (all(s % m == 0 for s in sizes) and list(slots) == sorted(slots))):
        # Every row has an adapter and the chunks are the rows where they already are: one row
        # each, or runs of m rows of one adapter (a batch of one adapter is one chunk).
        return Groups(len(slots), present, sizes, m, torch.tensor(slots[::m], device=device), None, None, None)
    chunk_slots, gather, rows, back = [], [], [], []
    for slot in present:
        for at in range(0, len(members[slot]), m):
            part = members[slot][at:at + m]
            chunk_slots.append(slot)
            back.extend(range(len(gather), len(gather) + len(part)))
            rows.extend(part)
            gather.extend(part + [part[0]] * (m - len(part)))
    # One copy to the device, then views.
    flat = torch.tensor(chunk_slots + gather + rows + back, device=device)
    chunk_slots_t, gather_t, rows_t, back_t = flat.split([len(chunk_slots), len(gather), len(rows), len(back)])
    return Groups(len(slots), present, sizes, m, chunk_slots_t, gather_t, rows_t, back_t if m > 1 else None)


@dataclass(frozen=True)
class _Gathered:
    """One layer's chunks' A and B for `groups` (None: no present adapter adapts the layer)."""

    groups: Groups
    weights: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class _Prepared:
    """The last slots `RowSlots.using` installed, as it sent them: reused while they repeat."""

    slots: tuple[int, ...]
    index: torch.Tensor | None
    """[B] slot per row on the device; None when no row has an adapter."""
    groups: Groups | None


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
            from loraserve.runner.lora_kernels import add_lora

            self.add_lora = add_lora
        self.index: torch.Tensor | None = None
        """[B] slot per row while a forward runs; None outside one, or when no row has an adapter."""
        self._groups: Groups | None = None
        self._last = _Prepared((), None, None)

    @contextlib.contextmanager
    def using(self, slots: tuple[int, ...], device: torch.device):
        """`slots` (one per row, 0 for none) for one forward."""
        if slots != self._last.slots:  # consecutive steps mostly carry the same rows
            index = torch.tensor(slots, device=device) if any(slots) else None
            groups = group_rows(slots, device) if index is not None and self.kernel == "grouped" else None
            self._last = _Prepared(slots, index, groups)
        with self._installed(self._last.index, self._last.groups):
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
        self._gathered: _Gathered | None = None

    def allocate(self, slots: int, rank: int, device, dtype) -> None:
        self.a = torch.zeros(slots, self.in_features, rank, device=device, dtype=dtype)
        self.b = torch.zeros(slots, rank, self.out_features, device=device, dtype=dtype)
        self.ranks = [0] * slots
        self.rank_table = torch.zeros(slots, dtype=torch.int32, device=device)

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
        column of a row uses the row's slot): the rows' activations gathered into chunks (a copy
        of activations, not of weights; none when the rows are the chunks), each chunk's A and B
        at the largest rank present here (columns past a slot's rank are zero), two batched
        matmuls for all adapters at once, and one index-add of the real rows' deltas back."""
        weights = self._chunk_weights(groups)
        if weights is None:  # no adapter present adapts this layer
            return y
        a, b = weights
        rows = groups.count
        width = x.numel() // (rows * self.in_features)  # columns per row
        chunks, m = groups.chunk_slots.shape[0], groups.chunk
        if groups.gather is None:
            shrunk = torch.bmm(x.reshape(chunks, m * width, self.in_features).to(a.dtype), a)
            ys = y.view(chunks, m * width, self.out_features)
            if y.dtype == b.dtype:
                ys.baddbmm_(shrunk, b)
            else:
                ys.add_(torch.bmm(shrunk, b).to(y.dtype))
            return y
        ys = y.view(rows, width, self.out_features)
        xs = x.reshape(rows, width, self.in_features).index_select(0, groups.gather)
        xs = xs.view(chunks, m * width, self.in_features).to(a.dtype)
        delta = torch.bmm(torch.bmm(xs, a), b).view(chunks * m, width, self.out_features)
        if groups.back is not None:
            delta = delta.index_select(0, groups.back)
        ys.index_add_(0, groups.rows, delta.to(y.dtype))
        return y

    def _chunk_weights(self, groups: Groups) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[P, in, r] and [P, r, out]: each chunk's slot's A and B at the largest rank present
        here, kept while the same `groups` come back (when they fit in as many chunks as slots)."""
        cached = self._gathered
        if cached is not None and cached.groups is groups:
            return cached.weights
        r = max(self.ranks[slot] for slot in groups.slots)
        weights = None
        if r:
            weights = (self.a[:, :, :r].index_select(0, groups.chunk_slots),
                       self.b[:, :r, :].index_select(0, groups.chunk_slots))
        if groups.chunk_slots.shape[0] <= self.a.shape[0]:
            self._gathered = _Gathered(groups, weights)
        return weights

    def write(self, slot: int, entry: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put one adapter's (A^T, scale x B^T) for this layer into `slot` (None clears it). From
        page-locked host memory the copies are asynchronous on the current stream."""
        self._gathered = None  # before any copy: a write that raises leaves no stale chunks
        r = 0 if entry is None else entry[0].shape[1]
        if entry is not None:
            self.a[slot, :, :r].copy_(entry[0], non_blocking=True)
            self.b[slot, :r, :].copy_(entry[1], non_blocking=True)
        self.a[slot, :, r:].zero_()
        self.b[slot, r:, :].zero_()
        self.ranks[slot] = r
        self.rank_table[slot] = r  # on the same stream as the weights it describes

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
