"""The paged KV pool and the attention that reads it (vLLM's PagedAttention, over torch ops).

One tensor holds every layer's keys and values: [layers, 2, blocks + 1, block_size, kv_heads,
head_dim], allocated once at start-up; the extra block is scratch, written only by the padding
rows of a captured decode step and read by no sequence. The scheduler's BlockManager decides
which blocks each sequence holds; a step hands the model its rows' block tables (StepContext,
passed through the HF forward as the `kv_step` keyword) and the attention registered here:

* writes the step's new keys/values at their positions (block table[p // block_size] at offset
  p % block_size): nothing else is written, so a step that raises leaves only positions its rows'
  lengths do not cover yet, which the retry overwrites;
* reads, for each row, its own blocks only. Decode: on CUDA, FlexAttention over a block mask
  built from the block tables (each row visits the blocks its table lists, the last one up to its
  length), with no copy; elsewhere (or `attention="reference"`), a gather of the row's positions
  and SDPA with a length mask, which the tests compare the kernel with. Prefill: the first chunk
  of prompts with nothing cached attends its fresh keys; a later chunk, or a prompt whose prefix
  sits in shared blocks, gathers its rows' positions up to the chunk's end.

Positions past a row's length are masked; what sits there is finite (the pool starts zeroed and
blocks a failed sequence held are zeroed before reuse, runner.engine.scrub), because a masked
NaN still poisons both SDPA and FlexAttention (0 x NaN in the value sum). GQA is handled by the
kernels' enable_gqa, with no repeat_kv copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION = "loraserve_paged"
KERNELS = ("auto", "flex", "reference")


@dataclass(frozen=True)
class PoolGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    max_len: int
    """Most tokens one sequence holds (prompt + generated)."""
    block_size: int = 16

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype.itemsize

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        return self.block_size * self.bytes_per_token(dtype)

    @property
    def blocks_per_sequence(self) -> int:
        return -(-self.max_len // self.block_size)


class KVPool:
    def __init__(self, geometry: PoolGeometry, blocks: int, device: torch.device, dtype: torch.dtype):
        self.geometry, self.blocks = geometry, blocks
        self.scratch = blocks
        g = geometry
        self.kv = torch.zeros((g.layers, 2, blocks + 1, g.block_size, g.kv_heads, g.head_dim),
                              device=device, dtype=dtype)
        # Per layer, [positions, kv_heads, head_dim] views: position p of block b is row b*block_size + p.
        self.keys = [self.kv[i, 0].view(-1, g.kv_heads, g.head_dim) for i in range(g.layers)]
        self.values = [self.kv[i, 1].view(-1, g.kv_heads, g.head_dim) for i in range(g.layers)]

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    @property
    def tokens(self) -> int:
        return self.blocks * self.geometry.block_size

    def scrub(self, blocks: list[int]) -> None:
        """Zero `blocks` in every layer (one kernel): they may hold a failed sequence's NaN."""
        self.kv[:, :, torch.tensor(blocks, device=self.kv.device)] = 0


@dataclass(frozen=True)
class StepContext:
    """One step's view of the pool. B rows; a prefill chunk has C columns (left-padded)."""

    pool: KVPool
    write: torch.Tensor
    """[N] long: pool positions (block * block_size + offset) the step's N valid tokens go to."""
    prefill: bool
    tables: torch.Tensor
    """[B, W] int32 block tables (W: at least the blocks read; padded with the scratch block)."""
    read_len: int = 0
    """Reference reads: positions gathered per row (0: a first prefill chunk, its fresh keys)."""
    mask: torch.Tensor | None = None
    """Reference reads: [B, 1, C, L] bool, key position visible to query (decode: C = 1)."""
    picked: tuple[torch.Tensor, torch.Tensor] | None = None
    """prefill: (rows, columns) of the N valid tokens in the chunk's [B, C] grid."""
    block_mask: object | None = None
    """FlexAttention decode: the BlockMask over the rows' own blocks (None: reference read)."""


def _gather_index(tables: torch.Tensor, read_len: int, block_size: int) -> torch.Tensor:
    """[B, read_len] pool positions of each row's first read_len tokens."""
    blocks = -(-read_len // block_size)
    offsets = torch.arange(block_size, device=tables.device)
    return (tables[:, :blocks, None] * block_size + offsets).flatten(1)[:, :read_len]


@dataclass(frozen=True)
class PrefillPlan:
    """The host side of one prefill chunk: columns [begin, end) of B rows' fed tokens, left-padded
    to one width T (row i feeds fed[i] tokens at positions cached[i] .. cached[i] + fed[i] - 1; its
    first cached[i] positions sit in blocks already). Everything the device needs is in `values`,
    sent with the step's one copy in (runner/staging.py); `prefill_context` reads it there."""

    rows: int
    columns: int
    """C, the chunk's columns."""
    tokens: int
    """N, the chunk's real (unpadded) tokens."""
    table_width: int
    read_len: int
    """Positions gathered per row; 0 for a first chunk with nothing cached (its fresh keys only)."""
    values: list[int]
    """ids, grid rows, grid columns, positions (N each, row-major: the rows' tokens in order),
    each row's first real column (in chunk columns, may be negative) and cached count (B each),
    block tables [B, table_width]."""

    @property
    def positions(self) -> list[int]:
        return self.values[3 * self.tokens:4 * self.tokens]


def plan_prefill(tables: list[list[int]], cached: list[int], fed: list[list[int]], scratch: int,
                 begin: int = 0, end: int | None = None) -> PrefillPlan:
    width = max(map(len, fed))
    end = width if end is None else end
    ids, rows, cols, positions, starts = [], [], [], [], []
    for i, tokens in enumerate(fed):
        start = width - len(tokens)  # first real column
        starts.append(start - begin)
        lo = max(begin, start)
        if lo >= end:  # all padding in these columns
            continue
        ids += tokens[lo - start:end - start]
        rows += [i] * (end - lo)
        cols += range(lo - begin, end - begin)
        positions += range(cached[i] + lo - start, cached[i] + end - start)
    table_width = max(map(len, tables))
    flat = [t for table in tables for t in (*table, *[scratch] * (table_width - len(table)))]
    read_len = 0 if begin == 0 and not any(cached) else max(positions) + 1
    return PrefillPlan(len(fed), end - begin, len(ids), table_width, read_len,
                       [*ids, *rows, *cols, *positions, *starts, *cached, *flat])


def prefill_context(pool: KVPool, plan: PrefillPlan, dev: torch.Tensor) -> tuple[StepContext, torch.Tensor,
                                                                                torch.Tensor]:
    """`plan`'s values already on the device (`dev`) -> (context, ids [B, C], positions [B, C]),
    built there with no further copy or sync."""
    bs, n, b, c = pool.geometry.block_size, plan.tokens, plan.rows, plan.columns
    ids, rows, cols, pos = dev[:4 * n].view(4, n)
    start, cached = dev[4 * n:4 * n + 2 * b].view(2, b, 1)
    tables = dev[4 * n + 2 * b:].view(b, plan.table_width).to(torch.int32)
    write = tables[rows, pos // bs].long() * bs + pos % bs
    col = torch.arange(c, device=dev.device)
    valid = col >= start  # [B, C]
    positions = (col - start).clamp(min=0) + cached  # [B, C]; padding columns repeat the first position
    grid = torch.zeros((b, c), dtype=torch.long, device=dev.device)
    grid[rows, cols] = ids
    if not plan.read_len:
        causal = col.unsqueeze(0) <= col.unsqueeze(1)  # [C(query), C(key)]
        # Padding queries may see only themselves: a fully masked row would make SDPA produce NaN.
        mask = (causal & valid.unsqueeze(1)) | torch.eye(c, dtype=torch.bool, device=dev.device)
    else:
        key = torch.arange(plan.read_len, device=dev.device)
        # Each query sees its own row's positions up to its own; padding queries see position 0.
        mask = torch.where(valid.unsqueeze(2), key <= positions.unsqueeze(2), key == 0)  # [B, C, L]
    return StepContext(pool, write, True, tables, plan.read_len, mask.unsqueeze(1), (rows, cols)), grid, positions


def decode_view(pool: KVPool, tables: torch.Tensor, lengths: torch.Tensor, kernel: str,
                read_len: int) -> StepContext:
    """The decode context from device tensors alone (what a captured step can build): `tables`
    [B, W] int32, `lengths` [B] long. `read_len` sizes the reference gather only."""
    bs = pool.geometry.block_size
    last = tables.gather(1, (lengths // bs).unsqueeze(1)).squeeze(1)  # [B] the block being written
    write = last * bs + lengths % bs
    if kernel == "flex":
        return StepContext(pool, write, False, tables, block_mask=_block_mask(pool, tables, lengths, last))
    mask = torch.arange(read_len, device=tables.device) <= lengths.unsqueeze(1)  # [B, L]
    return StepContext(pool, write, False, tables, read_len, mask[:, None, None, :])


def _block_mask(pool: KVPool, tables: torch.Tensor, lengths: torch.Tensor, last: torch.Tensor):
    """Each row visits its table's first length // block_size + 1 blocks; all but the last are full,
    the last is visible up to offset length % block_size. FlexAttention wants kv_indices as wide as
    the pool's blocks: the rows' tables fill the front, the rest is never visited."""
    from torch.nn.attention.flex_attention import BlockMask

    bs, rows = pool.geometry.block_size, tables.shape[0]
    indices = tables
    if tables.shape[1] < pool.blocks + 1:  # a captured step's buffer is that wide already
        indices = torch.zeros((rows, pool.blocks + 1), dtype=torch.int32, device=tables.device)
        indices[:, :tables.shape[1]] = tables
    last_offset = lengths % bs

    def visible(b, h, q_idx, kv_idx):
        return (kv_idx // bs != last[b]) | (kv_idx % bs <= last_offset[b])

    return BlockMask.from_kv_blocks((lengths // bs + 1).to(torch.int32).view(rows, 1, 1), indices.view(rows, 1, 1, -1),
                                    BLOCK_SIZE=(128, bs), mask_mod=visible, seq_lengths=(1, pool.tokens + bs),
                                    compute_q_blocks=False)


_compiled_flex = None


def _flex(query, key, value, block_mask, scale):
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one per batch bucket
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True)


@dataclass(frozen=True)
class MixedContext:
    """A step that decodes some rows and prefills chunks of others in one forward: its tokens are
    packed into one sequence [1, N], the `decoding` rows' tokens first (one each), then each
    chunk's tokens in order (the prefill grid's row-major real tokens). Every layer but the
    attention runs once over all of them; the attention splits them by kind."""

    decode: StepContext
    prefill: StepContext
    decoding: int


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv_step=None, **_):
    """HF attention interface: query [B, H, T, D], key/value [B, Hkv, T, D] (rotary applied)."""
    if isinstance(kv_step, MixedContext):
        return _mixed(module.layer_idx, kv_step, query, key, value, scaling), None
    return _attend(module.layer_idx, kv_step, query, key, value, scaling), None


def _mixed(layer: int, ctx: MixedContext, query, key, value, scaling) -> torch.Tensor:
    """[1, N, H, D]: the decode rows' part as a decode step ([n, H, 1, D] per tensor), the chunks'
    part scattered into their [B, C] grid as a prefill step and gathered back."""
    n = ctx.decoding
    rows, cols = ctx.prefill.picked
    b, c = ctx.prefill.mask.shape[0], ctx.prefill.mask.shape[2]

    def decoding(t: torch.Tensor) -> torch.Tensor:
        return t[0, :, :n].transpose(0, 1).unsqueeze(2)

    def grid(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((b, t.shape[1], c, t.shape[3]))
        out[rows, :, cols] = t[0, :, n:].transpose(0, 1)
        return out

    decoded = _attend(layer, ctx.decode, decoding(query), decoding(key), decoding(value), scaling)  # [n, 1, H, D]
    prefilled = _attend(layer, ctx.prefill, grid(query), grid(key), grid(value), scaling)  # [B, C, H, D]
    return torch.cat((decoded[:, 0], prefilled[rows, cols])).unsqueeze(0)


def _attend(layer: int, ctx: StepContext, query, key, value, scaling) -> torch.Tensor:
    """[B, T, H, D] contiguous."""
    k_pool, v_pool = ctx.pool.keys[layer], ctx.pool.values[layer]
    if ctx.prefill:
        rows, cols = ctx.picked
        k_pool[ctx.write] = key.transpose(1, 2)[rows, cols]
        v_pool[ctx.write] = value.transpose(1, 2)[rows, cols]
    else:
        k_pool[ctx.write] = key[:, :, 0]
        v_pool[ctx.write] = value[:, :, 0]
    if ctx.block_mask is not None:
        out = _flex(query, k_pool.unsqueeze(0).transpose(1, 2), v_pool.unsqueeze(0).transpose(1, 2),
                    ctx.block_mask, scaling)
        return out.transpose(1, 2).contiguous()
    k, v = key, value
    if ctx.read_len:
        index = _gather_index(ctx.tables, ctx.read_len, ctx.pool.geometry.block_size)  # [B, L]
        # Positions no query of the row sees (past its length, or in the scratch block that pads a
        # short table) are zeroed in the copy: masking alone would let a NaN there through.
        seen = ctx.mask.any(dim=2).unsqueeze(-1)  # [B, 1, L, 1]
        k = torch.where(seen, k_pool[index].transpose(1, 2), 0)  # [B, Hkv, L, D]
        v = torch.where(seen, v_pool[index].transpose(1, 2), 0)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=ctx.mask, scale=scaling,
                                         enable_gqa=query.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(ATTENTION, paged_attention)


def geometry_of(config, max_len: int, block_size: int) -> PoolGeometry:
    heads = config.num_attention_heads
    return PoolGeometry(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                        getattr(config, "head_dim", None) or config.hidden_size // heads, max_len, block_size)
