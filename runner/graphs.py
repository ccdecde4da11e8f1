"""Decode steps over persistent buffers, replayed from CUDA graphs on a GPU.

A graph fixes every shape and address, so one is captured per bucket (rows, LoRA on/off), all
of them at start-up when capturing (capture_all; on first use otherwise); the attended length is no key: the FlexAttention block mask visits each row's own
blocks, however many its length needs.

* rows are rounded up to a power of two (capped at the batch size); padding rows decode a pad
  token at position 0 of the pool's scratch block with no adapter, and their logits are dropped;
* LoRA is on when a row has an adapter: the LoRA kernels read each row's slot and that slot's
  rank from device tensors (runner/lora_kernels.py), so no rank is part of the key; off, the
  LoRA add is skipped altogether.

Each step copies its rows' tokens, lengths and LoRA slots into one [3, rows] buffer and the
front of their block tables into a [rows, blocks + 1] one (the width FlexAttention's kv_indices
take), then replays. The KV pool, the LoRA slot stacks and rank tables and the buffers are
allocated once and never move, and an adapter is attached by copying into its slot (and its
rank into the tables) in place, so adapters coming and going leave every graph valid.

Without capture (a CPU, or `capture=False`) the very same function runs eagerly over the same
buffers: everything but the capture itself is exercised by the CPU test suite, with the
reference attention (a gather as long as the step's longest row) where FlexAttention is not used.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from loraserve.runner.kvpool import KVPool, decode_view
from loraserve.runner.staging import Staging, decode_rows, decode_views

log = logging.getLogger(__name__)

IDS, LENGTHS, LORA = range(3)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class DecodeGraphs:
    def __init__(self, model_step: Callable[..., torch.Tensor], pool: KVPool, pad: int, capture: bool,
                 max_rows: int, kernel: str):
        """`model_step(ids [b,1], positions [b,1], ctx, lora_index [b] | None) -> logits [b, vocab]`."""
        self._step, self._pool, self._pad = model_step, pool, pad
        self._capture, self._kernel = capture, kernel
        self._device = device = pool.kv.device
        self._rows = max_rows
        self._buf = torch.zeros((3, max_rows), dtype=torch.long, device=device)
        self._tables = torch.full((max_rows, pool.blocks + 1), pool.scratch, dtype=torch.int32, device=device)
        self._staging = Staging(max_rows * (3 + pool.geometry.blocks_per_sequence), device)  # one copy in per step
        self._read_len = 1  # reference attention only (never captured): the step's longest row + 1
        self._graphs: dict[tuple[int, bool], Callable[[], torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture and torch.cuda.is_available() else None

    @property
    def capturing(self) -> bool:
        return self._capture

    @property
    def captured(self) -> int:
        """Buckets seen so far (graphs captured, when capturing)."""
        return len(self._graphs)

    def bucket(self, rows: int, lora: bool) -> tuple[int, bool]:
        return min(_pow2(rows), self._rows), bool(lora)

    def capture_all(self, max_rows: int) -> int:
        """Every bucket up to `max_rows` rows, LoRA on and off, before any request: largest first,
        so the smaller graphs reuse the memory pool the largest took. The buffers hold padding rows
        (scratch block, position 0, no adapter), so the warm-ups write only the scratch block.
        Returns the graphs captured."""
        sizes = sorted({self.bucket(n, False)[0] for n in range(1, max_rows + 1)}, reverse=True)
        for rows in sizes:
            for lora in (True, False):
                key = (rows, lora)
                if key not in self._graphs:
                    self._graphs[key] = self._record(key)
        return len(self._graphs)

    def run(self, tokens: list[int], lengths: list[int], tables: list[tuple[int, ...]],
            lora_slots: list[int]) -> torch.Tensor:
        """[n, vocab] logits of the rows' next tokens; `lengths`: tokens each row holds, `tables`
        each row's blocks (covering position `length`), `lora_slots` each row's adapter slot (0: none)."""
        n = len(tokens)
        key = self.bucket(n, any(lora_slots))
        pad = key[0] - n
        width = max(len(t) for t in tables)
        flat, _ = decode_rows(tokens, lengths, lora_slots, tables, pad, self._pad, self._pool.scratch)
        packed, front = decode_views(self._staging.send(flat), key[0], width)
        self._buf[:, :key[0]].copy_(packed)
        self._tables[:key[0], :width].copy_(front)
        self._read_len = max(lengths) + 1
        replay = self._graphs.get(key)
        if replay is None:
            replay = self._graphs[key] = self._record(key)
        return replay()[:n].to(torch.float32, copy=True)

    def _function(self, key: tuple[int, bool]) -> Callable[[], torch.Tensor]:
        rows, lora = key
        buf, tables = self._buf[:, :rows], self._tables[:rows]

        def step() -> torch.Tensor:
            positions = buf[LENGTHS].unsqueeze(1)  # [b, 1]: each row writes at its length
            ctx = decode_view(self._pool, tables, buf[LENGTHS], self._kernel, self._read_len)
            return self._step(buf[IDS].unsqueeze(1), positions, ctx, buf[LORA] if lora else None)
        return step

    def _record(self, key: tuple[int, bool]) -> Callable[[], torch.Tensor]:
        step = self._function(key)
        if not self._capture:
            return step
        try:
            replay = self._captured(step)
        except torch.OutOfMemoryError:
            raise  # the scheduler splits the rows: a smaller bucket may fit
        except Exception as exc:
            raise CaptureFailed(f"capturing the decode step for {key[0]} rows, LoRA {'on' if key[1] else 'off'} "
                                f"failed: {type(exc).__name__}: {exc}") from exc
        log.info("captured the decode graph for %d rows, LoRA %s", key[0], "on" if key[1] else "off")
        return replay

    def _captured(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The step as a CUDA graph. The warm-up runs compute the current step for real: they write
        the same keys and values at the same positions as the replay that follows."""
        with torch.cuda.device(self._device):  # the engine thread's current device may be another
            side = torch.cuda.Stream(self._device)
            side.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations (cuBLAS handles, autotuning) happen outside capture
                    step()
            torch.cuda.current_stream(self._device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the loader threads' page-locked allocations may go on meanwhile
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                out = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay


class CaptureFailed(RuntimeError):
    """A model whose decode step cannot be captured (a kernel that syncs with the host, say)."""
