"""One preallocated KV cache, one fixed slot per running sequence, and the attention that uses it.

Per layer, keys and values are [slots, kv_heads, max_len, head_dim], allocated once at start-up.
The scheduler gives each admitted sequence a slot for its whole life, so joining and leaving
never copy another row's cache. A step hands the model its rows' slots and lengths (StepContext,
passed through the HF forward as the `kv_step` keyword); the attention registered here writes the
step's new keys/values into those slots and reads each row's own prefix only:

* prefill: rows are left-padded to one width T; the fresh [B, Hkv, T, D] keys/values are
  attended with a causal + padding mask and their valid columns scattered into the pool.
* decode: each row writes one column at its own length, then attends over its slot's first
  `length + 1` positions (a view when the rows' slots are consecutive, else one gather).

A row never reads another row's slot, and reads of its own slot past its length see zeros
(what a previous occupant wrote past the new prompt is cleared when a sequence is prefilled
into the slot), so a NaN left by a failed neighbour or a previous occupant cannot reach it. GQA is handled by SDPA's enable_gqa, with
no repeat_kv copies. Nothing here outlives a step: a step that raises has only written into
its own rows' slots at positions their lengths do not yet cover, which the retry overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION = "loraserve_pool"


@dataclass(frozen=True)
class PoolGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    max_len: int
    """Most tokens one sequence holds (prompt + generated)."""

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.max_len * self.head_dim * dtype.itemsize


class KVPool:
    def __init__(self, geometry: PoolGeometry, slots: int, device: torch.device, dtype: torch.dtype,
                 scratch: bool = False):
        self.geometry, self.slots = geometry, slots
        self.scratch = slots if scratch else None
        """One extra slot no sequence owns: padding rows of a captured decode step write there."""
        shape = (slots + scratch, geometry.kv_heads, geometry.max_len, geometry.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(geometry.layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(geometry.layers)]
        self.written = [0] * slots
        """Per slot, how far any step has written (pool hygiene, not batch state): a new occupant
        needs only [its prompt, written) cleared, not the whole slot."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def claim(self, slots: list[int], lengths: list[int], whole: bool = False) -> None:
        """Prefill of `lengths`-token prompts into `slots`: clear what earlier occupants left beyond
        them, or everything they left when `whole` (a chunked prefill reads positions of its own
        slot that later chunks have not written yet, masked, and a masked NaN still poisons)."""
        for slot, length in zip(slots, lengths, strict=True):
            start = 0 if whole else length
            if self.written[slot] > start:
                for t in (*self.keys, *self.values):
                    t[slot, :, start:self.written[slot]] = 0
            self.written[slot] = length

    def wrote(self, slots: list[int], lengths: list[int]) -> None:
        """A decode step writes position `length` of each slot."""
        for slot, length in zip(slots, lengths, strict=True):
            if length >= self.written[slot]:
                self.written[slot] = length + 1


@dataclass(frozen=True)
class StepContext:
    """One step's view of the pool. B rows; for prefill T is the padded prompt width."""

    pool: KVPool
    slots: torch.Tensor
    """[B] long: each row's pool slot."""
    prefill: bool
    mask: torch.Tensor
    """prefill: [B, 1, C, C] bool (causal and not padding) for a first chunk of C columns,
    [B, 1, C, L] (key position <= query position) for a later one; decode: [B, 1, 1, L] bool
    (position < length + 1)."""
    write_at: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor
    """prefill: (rows, columns in the chunk, positions) of the valid tokens, each [N]; decode: [B] positions."""
    span: slice | None = None
    """decode, when the slots are consecutive: the pool rows to read as a view, no gather."""
    read_len: int = 0
    """Positions read from the rows' slots (decode, and prefill chunks after the first; 0: none)."""


def prefill_context(pool: KVPool, slots: list[int], lengths: list[int], device: torch.device,
                    begin: int = 0, end: int | None = None) -> StepContext:
    """Columns [begin, end) of the prompts left-padded to one width T (a chunk; all of it by
    default). The first chunk attends its own fresh keys; a later chunk reads its rows' slots,
    where the earlier chunks wrote theirs."""
    width = max(lengths)
    end = width if end is None else end
    col = torch.arange(begin, end)
    start = torch.tensor([width - n for n in lengths]).unsqueeze(1)  # [B, 1] first real column
    valid = col.unsqueeze(0) >= start  # [B, C]
    positions = (col.unsqueeze(0) - start).clamp(min=0)  # [B, C]
    if begin == 0:
        causal = col.unsqueeze(0) <= col.unsqueeze(1)  # [C(query), C(key)]
        # Padding queries may see only themselves: a fully masked row would make SDPA produce NaN.
        mask = (causal.unsqueeze(0) & valid.unsqueeze(1)) | torch.eye(len(col), dtype=torch.bool).unsqueeze(0)
        read_len = 0
    else:
        read_len = end - int(start.min())
        key = torch.arange(read_len)
        # Each query sees its own slot's positions up to its own; padding queries see position 0.
        mask = torch.where(valid.unsqueeze(2), key <= positions.unsqueeze(2), key == 0)  # [B, C, L]
    rows, cols = valid.nonzero(as_tuple=True)
    slot_t = torch.tensor(slots, device=device)
    return StepContext(pool, slot_t, True, mask.unsqueeze(1).to(device),
                       (rows.to(device), cols.to(device), positions[rows, cols].to(device)), read_len=read_len)


def decode_context(pool: KVPool, slots: list[int], lengths: list[int], device: torch.device) -> StepContext:
    """`lengths`: tokens each row already holds; this step writes position `length`."""
    read_len = max(lengths) + 1
    positions = torch.tensor(lengths)
    mask = torch.arange(read_len).unsqueeze(0) <= positions.unsqueeze(1)  # [B, L]
    consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
    return StepContext(pool, torch.tensor(slots, device=device), False, mask[:, None, None, :].to(device),
                       positions.to(device), slice(slots[0], slots[0] + len(slots)) if consecutive else None,
                       read_len)


def pool_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv_step=None,
                   **_):
    """HF attention interface: query [B, H, T, D], key/value [B, Hkv, T, D] (rotary applied)."""
    ctx: StepContext = kv_step
    k_pool, v_pool = ctx.pool.keys[module.layer_idx], ctx.pool.values[module.layer_idx]
    if ctx.prefill:
        rows, cols, positions = ctx.write_at
        slots = ctx.slots[rows]
        k_pool[slots, :, positions] = key[rows, :, cols]
        v_pool[slots, :, positions] = value[rows, :, cols]
        k, v = key, value
        if ctx.read_len:
            k, v = k_pool[ctx.slots, :, :ctx.read_len], v_pool[ctx.slots, :, :ctx.read_len]
    else:
        k_pool[ctx.slots, :, ctx.write_at] = key[:, :, 0]
        v_pool[ctx.slots, :, ctx.write_at] = value[:, :, 0]
        if ctx.span is not None:
            k, v = k_pool[ctx.span, :, :ctx.read_len], v_pool[ctx.span, :, :ctx.read_len]
        else:
            k, v = k_pool[ctx.slots, :, :ctx.read_len], v_pool[ctx.slots, :, :ctx.read_len]
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=ctx.mask, scale=scaling,
                                         enable_gqa=query.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, pool_attention)


def geometry_of(config, max_len: int) -> PoolGeometry:
    heads = config.num_attention_heads
    return PoolGeometry(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                        getattr(config, "head_dim", None) or config.hidden_size // heads, max_len)
