"""Only the engine thread runs torch ops on several threads (runner/threads.py says why: with
torch's OpenMP build, a second thread's parallel op slows every later one of the engine's). What
is asserted is each thread's intra-op count, never a timing."""

from __future__ import annotations

import asyncio

import torch
from conftest import demo_ref

from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.runner.threads import INTRA_OP_THREADS, engine_executor, side_executor


def test_side_threads_use_one_thread_and_a_later_engine_thread_still_gets_the_process_count():
    side = side_executor(2, "side")
    engine = engine_executor()
    try:
        assert side.submit(torch.get_num_threads).result() == 1
        # torch gives a thread that first runs an op the count last set anywhere (1, just above):
        # the engine thread sets its own.
        assert engine.submit(torch.get_num_threads).result() == INTRA_OP_THREADS
    finally:
        side.shutdown()
        engine.shutdown()


def test_the_engine_reads_adapters_on_one_thread_and_steps_on_all_of_its_own(demo_dir):
    engine = TorchEngine(EngineConfig(demo_dir / "base"))

    async def run() -> tuple[int, int]:
        await engine.start()
        try:
            await engine.fetch(demo_ref(demo_dir, "legal"))
            loader = await asyncio.get_running_loop().run_in_executor(engine._adapters._loaders,
                                                                      torch.get_num_threads)
            return loader, await engine._run(torch.get_num_threads)
        finally:
            await engine.close()

    assert asyncio.run(run()) == (1, INTRA_OP_THREADS)
