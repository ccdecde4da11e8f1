"""The server under benchmark: `loraserve serve` in a child process, healthy before it is used."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.v1 import admin_pb2, admin_pb2_grpc


class ServerProcess:
    """`loraserve serve` in a child process, so the load generator does not share its GIL."""

    def __init__(self, model_path: Path, store: Path, extra: list[str], log: Path | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        sink = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraserve.server.cli", "serve", "--port", str(self.port), "--metrics-port", "-1",
             "--model-path", str(model_path), "--adapters-dir", str(store), "--log-level", "WARNING", *extra],
            stdout=sink, stderr=sink)
        if log:
            sink.close()
        try:
            self._await_serving(log)
        except BaseException:
            self.proc.kill()  # a server that never served must not keep holding the device
            self.proc.wait(60)
            raise

    def _await_serving(self, log: Path | None) -> None:
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(self.target) as ch:
            while time.monotonic() < deadline:
                try:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError("the server exited during start-up" + (f" (its log: {log})" if log else ""))
                time.sleep(0.2)
        raise TimeoutError("the server did not become healthy")

    def cache_stats(self) -> dict:
        with grpc.insecure_channel(self.target) as ch:
            stats = admin_pb2_grpc.AdapterAdminServiceStub(ch).GetCacheStats(admin_pb2.GetCacheStatsRequest(),
                                                                              timeout=10)
        vram = next(t for t in stats.tiers if t.tier == admin_pb2.TIER_VRAM)
        # The VRAM tier budgets whole slots, so its budget over one attached adapter's bytes is the slots.
        slots = vram.bytes_budget * vram.adapters // vram.bytes_used if vram.bytes_used else 0
        return {"vram_hits": vram.hits, "vram_misses": vram.misses, "vram_slots": slots,
                "evictions": sum(t.evictions for t in stats.tiers)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
