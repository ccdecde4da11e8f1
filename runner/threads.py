"""Torch's intra-op threads belong to the engine thread alone.

With torch's OpenMP build every thread that runs a parallel op gets a team of worker threads of
its own. Once a process holds more OpenMP threads than cores, libgomp stops letting idle workers
spin, and every parallel region then pays for waking its workers: on a 2-core machine a 32-row
256x256 matmul on the engine thread went from about 32 µs to 110-125 µs, for the rest of the
process, after one hidden-4096 adapter was parsed on a loader thread
(`python -m loraserve.tools.bench.threads`). So threads other than the engine's
that run torch ops (adapter reads) run them on one thread, and the engine thread sets its own
count when it starts: torch gives a thread that first runs an op the count last set anywhere.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

INTRA_OP_THREADS = torch.get_num_threads()
"""The engine thread's: torch's choice for this process (or OMP_NUM_THREADS), read when the runner
is imported, before any side thread has set its own."""


def engine_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine", initializer=torch.set_num_threads,
                              initargs=(INTRA_OP_THREADS,))


def side_executor(workers: int, name: str) -> ThreadPoolExecutor:
    """Threads beside the engine's that may run torch ops: one intra-op thread each."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=torch.set_num_threads,
                              initargs=(1,))
