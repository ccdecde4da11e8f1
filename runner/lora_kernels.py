"""BGMV LoRA kernels in Triton (after Punica and vLLM's punica kernels): every row reads its own
adapter's weights in place, at its own adapter's rank, from the slot stacks runner/lora.py keeps.

    shrink: part[split, token, :rank] = x[token, k-range of split] @ a[slot, k-range, :rank]
    expand: y[token, :] += (sum over splits of part[., token, :rank]) @ b[slot, :rank, :]

`slot` is the slot of the token's row (a prefill row's columns all share it) and `rank` that
slot's entry in the layer's rank table; rows of slot 0 (no adapter), and slots whose adapter
does not adapt this layer (rank 0), return at once. Both launches have grids fixed by the
shapes alone and read slots and ranks on the device, so a CUDA graph captures them and replays
them whatever adapters come and go. The shrink splits the input features into a number of
parts fixed by the layer's width (not by the batch), and the expand adds the parts in order,
so a row's sums do not depend on the rows beside it. Accumulation is in float32.

Imported only where the engine runs on CUDA (runner.lora.RowSlots(kernel="triton")); the test
suite runs the kernels on CPU tensors under TRITON_INTERPRET=1 (tests/test_lora_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64
"""Input features one shrink iteration reads."""
BLOCK_N = 128
"""Output features one expand program writes."""


@triton.jit
def _shrink(x_ptr, a_ptr, slot_ptr, rank_ptr, part_ptr, in_features, width, k_per_split,
            x_stride, a_slot_stride, a_k_stride, part_split_stride, part_token_stride,
            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    token = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(slot_ptr + token // width)
    if slot == 0:
        return
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    x_row = x_ptr + token.to(tl.int64) * x_stride
    a_slot = a_ptr + slot.to(tl.int64) * a_slot_stride
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    start = split * k_per_split
    for k0 in range(start, start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        xv = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        av = tl.load(a_slot + offs_k[:, None] * a_k_stride + offs_r[None, :],
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv[:, None] * av, axis=0)
    tl.store(part_ptr + split * part_split_stride + token.to(tl.int64) * part_token_stride + offs_r, acc)


@triton.jit
def _expand(part_ptr, b_ptr, slot_ptr, rank_ptr, y_ptr, out_features, width, splits,
            part_split_stride, part_token_stride, b_slot_stride, b_r_stride, y_stride,
            BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    token = tl.program_id(0)
    block = tl.program_id(1)
    slot = tl.load(slot_ptr + token // width)
    if slot == 0:
        return
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    part_row = part_ptr + token.to(tl.int64) * part_token_stride
    shrunk = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for s in range(0, splits):
        shrunk += tl.load(part_row + s * part_split_stride + offs_r, mask=r_mask, other=0.0)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    bv = tl.load(b_ptr + slot.to(tl.int64) * b_slot_stride + offs_r[:, None] * b_r_stride + offs_n[None, :],
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(shrunk[:, None] * bv, axis=0)
    y_row = y_ptr + token.to(tl.int64) * y_stride + offs_n
    yv = tl.load(y_row, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_row, (yv + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def splits_for(in_features: int) -> int:
    """Shrink programs per token: more for wide layers (more programs in flight for a small
    batch), a function of the layer alone so a row's sum order never depends on its batch."""
    return max(1, min(8, in_features // 1024))


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
             ranks: torch.Tensor) -> None:
    """In place: y[i] += (x[i] @ a[index[i], :, :r]) @ b[index[i], :r, :], r = ranks[index[i]].

    x [B, in] or [B, T, in] (all T columns of row i use index[i]); y the same with out, contiguous;
    a [S, in, R] and b [S, R, out] contiguous stacks; index [B] integer slots; ranks [S] int32."""
    rows = index.shape[0]
    in_features, stack_rank = a.shape[1], a.shape[2]
    out_features = b.shape[2]
    xs = x.reshape(-1, in_features)
    if xs.stride(1) != 1:
        xs = xs.contiguous()
    ys = y.view(-1, out_features)
    tokens = xs.shape[0]
    width = tokens // rows
    block_r = triton.next_power_of_2(stack_rank)
    splits = splits_for(in_features)
    k_per_split = triton.cdiv(triton.cdiv(in_features, splits), BLOCK_K) * BLOCK_K
    part = torch.empty((splits, tokens, block_r), dtype=torch.float32, device=y.device)
    _shrink[(tokens, splits)](xs, a, index, ranks, part, in_features, width, k_per_split,
                              xs.stride(0), a.stride(0), a.stride(1), part.stride(0), part.stride(1),
                              BLOCK_K=BLOCK_K, BLOCK_R=block_r)
    _expand[(tokens, triton.cdiv(out_features, BLOCK_N))](
        part, b, index, ranks, ys, out_features, width, splits,
        part.stride(0), part.stride(1), b.stride(0), b.stride(1), ys.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_R=block_r)
