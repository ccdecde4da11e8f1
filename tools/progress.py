"""A text progress bar per stage on stderr, for the commands a newcomer runs first.

On a terminal a stage's bar redraws in place and ends with its time; elsewhere (CI, a log
file) each stage prints one line when it ends, so logs get no carriage-return noise.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class StageBars:
    """Callable as runner.demo's Progress: (stage, done, total)."""

    def __init__(self, stream: TextIO = sys.stderr):
        self._stream, self._tty = stream, stream.isatty()
        self._stage, self._started = "", 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self._stage, self._started = stage, time.perf_counter()
        if self._tty or done >= total:
            filled = WIDTH * done // max(total, 1)
            line = (f"  {stage:<24} [{'#' * filled}{'.' * (WIDTH - filled)}] {done:>4}/{total:<4} "
                    f"{time.perf_counter() - self._started:5.1f} s")
            end = "\n" if done >= total else ""
            self._stream.write(("\r" if self._tty else "") + line + end)
            self._stream.flush()
