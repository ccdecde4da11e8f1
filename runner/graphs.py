"""Decode steps over persistent buffers, replayed from CUDA graphs on a GPU.

A graph fixes every shape and address, so one is captured per bucket (rows, attended length,
LoRA rank), on first use:

* rows are rounded up to a power of two (capped at the pool's size); padding rows decode a pad
  token in the pool's scratch slot with no adapter, and their logits are dropped;
* the attended length is rounded up to a power of two (at least 64, at most max_len): a row's
  positions past its own length are masked, so a bucket serves every length up to it;
* the rank is the LoRA stacks' columns the step reads: the largest attached rank rounded up to
  a power of two (columns past an adapter's rank are zero), 0 when no row has an adapter (the
  LoRA add is skipped altogether).

Each step copies its rows' tokens, lengths, KV slots and LoRA slots into one [4, rows] buffer
(one host-to-device copy) and replays. The KV pool, the LoRA slot stacks and the buffers are
allocated once and never move, and an adapter is attached by copying into its slot in place, so
adapters coming and going leave every graph valid.

Without capture (a CPU, or `capture=False`) the very same function runs eagerly over the same
buffers: everything but the capture itself is exercised by the CPU test suite.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from runner.kvpool import KVPool, StepContext

log = logging.getLogger(__name__)

MIN_READ = 64
IDS, LENGTHS, KV, LORA = range(4)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class DecodeGraphs:
    def __init__(self, model_step: Callable[..., torch.Tensor], pool: KVPool, pad: int, capture: bool,
                 max_rank: int):
        """`model_step(ids [b,1], positions [b,1], ctx, lora_index [b] | None, rank) -> logits [b, vocab]`."""
        self._step, self._pool, self._pad = model_step, pool, pad
        self._capture, self._max_rank = capture, max_rank
        self._device = device = pool.keys[0].device
        self._rows = pool.slots
        self._buf = torch.zeros((4, self._rows), dtype=torch.long, device=device)
        self._arange = torch.arange(pool.geometry.max_len, device=device)
        self._graphs: dict[tuple[int, int, int], Callable[[], torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture and torch.cuda.is_available() else None

    @property
    def capturing(self) -> bool:
        return self._capture

    @property
    def captured(self) -> int:
        """Buckets seen so far (graphs captured, when capturing)."""
        return len(self._graphs)

    def bucket(self, rows: int, read: int, rank: int) -> tuple[int, int, int]:
        return (min(_pow2(rows), self._rows), min(max(_pow2(read), MIN_READ), self._pool.geometry.max_len),
                min(_pow2(rank), self._max_rank) if rank else 0)

    def run(self, tokens: list[int], lengths: list[int], kv_slots: list[int], lora_slots: list[int],
            rank: int) -> torch.Tensor:
        """[n, vocab] logits of the rows' next tokens; `lengths`: tokens each row's slot holds."""
        n = len(tokens)
        key = self.bucket(n, max(lengths) + 1, rank if any(lora_slots) else 0)
        pad = key[0] - n
        host = torch.tensor([tokens + [self._pad] * pad, lengths + [0] * pad,
                             kv_slots + [self._pool.scratch] * pad, lora_slots + [0] * pad])
        self._buf[:, :key[0]].copy_(host)
        replay = self._graphs.get(key)
        if replay is None:
            replay = self._graphs[key] = self._record(key)
        return replay()[:n].to(torch.float32, copy=True)

    def _function(self, key: tuple[int, int, int]) -> Callable[[], torch.Tensor]:
        rows, read, rank = key
        buf = self._buf[:, :rows]

        def step() -> torch.Tensor:
            positions = buf[LENGTHS].unsqueeze(1)  # [b, 1]: each row writes at its length
            mask = (self._arange[:read] <= positions)[:, None, None, :]  # [b, 1, 1, read]
            ctx = StepContext(self._pool, buf[KV], False, mask, buf[LENGTHS], None, read)
            return self._step(buf[IDS].unsqueeze(1), positions, ctx, buf[LORA] if rank else None, rank)
        return step

    def _record(self, key: tuple[int, int, int]) -> Callable[[], torch.Tensor]:
        step = self._function(key)
        if not self._capture:
            return step
        try:
            replay = self._captured(step)
        except torch.OutOfMemoryError:
            raise  # the scheduler splits the rows: a smaller bucket may fit
        except Exception as exc:
            raise CaptureFailed(f"capturing the decode step for {key[0]} rows, {key[1]} positions, LoRA rank "
                                f"{key[2]} failed: {type(exc).__name__}: {exc}") from exc
        log.info("captured the decode graph for %d rows, %d positions, LoRA rank %d", *key)
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
