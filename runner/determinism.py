"""torch's deterministic algorithms are one process-wide switch. Engines serving --deterministic
hold it on while any of them runs; the process's own setting comes back after the last one."""

from __future__ import annotations

import contextlib
import os
import threading

import torch

_lock = threading.Lock()
_holders = 0
_before = (False, False)  # (enabled, warn_only) when the first holder came


def hold() -> None:
    global _holders, _before
    with _lock:
        if _holders == 0:
            _before = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled())
            # cuBLAS is deterministic only with a fixed workspace, set before its first handle.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # warn_only: an op without a deterministic kernel logs a warning instead of failing requests.
            torch.use_deterministic_algorithms(True, warn_only=True)
        _holders += 1


def release() -> None:
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            torch.use_deterministic_algorithms(_before[0], warn_only=_before[1])


@contextlib.contextmanager
def held():
    """Hold the switch for a block (a demo build): engines already holding keep it, and it stays
    on for any engine that starts holding while the block runs."""
    hold()
    try:
        yield
    finally:
        release()
