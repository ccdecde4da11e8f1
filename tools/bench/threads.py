"""What a torch op on a second thread costs the engine thread's later ones (runner/threads.py).

A 32-row 256x256 matmul timed on an engine-like thread, before and after a hidden-4096 adapter is
parsed on a loader-like thread: once with plain thread pools, once with the engine's
(`engine_executor`, `side_executor`). Each mode runs in a fresh process, since what it measures
lasts as long as the process does. Tensors are made on the threads that use them: a parallel op
on the main thread would spoil the measurement by itself.

    python -m loraserve.tools.bench.threads
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def _matmul_us() -> float:
    import torch

    w, x = torch.ones(256, 256), torch.ones(32, 256)
    for _ in range(100):
        x @ w
    started = time.perf_counter()
    for _ in range(2000):
        x @ w
    return round((time.perf_counter() - started) / 2000 * 1e6, 1)


def _parse_wide_adapter() -> None:
    import torch

    from loraserve.runner.lora import parse_peft

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    parse_peft({"r": 16}, {key.format("A"): torch.ones(16, 4096), key.format("B"): torch.ones(4096, 16)})


def _measure(mode: str) -> dict:
    from loraserve.runner.threads import engine_executor, side_executor

    engine = engine_executor() if mode == "engine pools" else ThreadPoolExecutor(1)
    loader = side_executor(2, "load") if mode == "engine pools" else ThreadPoolExecutor(2)
    before = engine.submit(_matmul_us).result()
    loader.submit(_parse_wide_adapter).result()
    return {"mode": mode, "matmul_us_before": before, "matmul_us_after": engine.submit(_matmul_us).result()}


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(_measure(sys.argv[1])))
        return
    for mode in ("plain pools", "engine pools"):
        subprocess.run([sys.executable, "-m", "loraserve.tools.bench.threads", mode], check=True)


if __name__ == "__main__":
    main()
