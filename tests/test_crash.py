"""The CLI killed with SIGKILL at random moments never leaves the store broken, and concurrent
writers are serialised (`python -m loraserve.registry.cli`, tiny adapters, `--no-smoke`: no torch, so each
run takes a fraction of a second)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from conftest import REPO
from loraserve.registry.identity import BaseIdentity, base_identity
from loraserve.registry.passport import SmokeTest
from loraserve.registry.store import Store
from test_store_safety import consistent
from tiny import fake_base, tiny_adapter

ITERATIONS = 120  # register and promote alternately


def wait_for_lock(pid: int, timeout: float) -> None:
    """Until process `pid` holds an flock (the store's or staging's: it is inside its operation),
    so a kill lands in the few milliseconds that matter rather than during start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            if any(line.split()[4] == str(pid) for line in f if len(line.split()) > 4):
                return
        time.sleep(0.0005)


def passed(_dir):
    return SmokeTest(True, "now", [{"prompt": "p", "output": "o"}])


def cli(store, *args, env):
    return subprocess.Popen([sys.executable, "-m", "loraserve.registry.cli", "--store", str(store.root), *args], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def timed(proc) -> float:
    start = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return time.monotonic() - start


def test_sigkill_at_random_moments_leaves_one_consistent_store(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    raw, base = tiny_adapter(tmp_path / "raw"), fake_base(tmp_path / "base")
    store = Store.local(tmp_path / "store")
    identity: BaseIdentity = base_identity(base)
    for _ in range(2):  # promotable versions (smoke-tested in process)
        store.register(raw, "x", identity, passed)
    register = ("register", str(raw), "--name", "x", "--no-smoke", "--model-path", str(base))
    spans = {"register": timed(cli(store, *register, env=env)), "promote": timed(cli(store, "promote", "x", "1",
                                                                                   env=env))}
    rng = random.Random(1302)
    killed = 0
    for i in range(ITERATIONS):
        op = ("register", "promote")[i % 2]
        args = register if op == "register" else ("promote", "x", str(1 + (i // 2) % 2))
        proc = cli(store, *args, env=env)
        if (i // 2) % 2:  # anywhere in the run, start-up included
            time.sleep(rng.uniform(0, spans[op] * 1.2))
        else:  # inside the operation
            wait_for_lock(proc.pid, spans[op] * 3)
            time.sleep(rng.uniform(0, 0.01))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        snap = Store.open(store.root).snapshot()  # what the next CLI run or server start does
        index = consistent(store)
        assert len(index) == len(snap.passports) >= 2
    assert killed >= ITERATIONS // 4, "the kills mostly came too late to test anything"
    assert timed(cli(store, *register, env=env)) and timed(cli(store, "promote", "x", "2", env=env))
    snap = Store.open(store.root).snapshot()
    assert snap.active("x").version == "2" and consistent(store)


def test_concurrent_writers_are_serialised(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    raw, base = tiny_adapter(tmp_path / "raw"), fake_base(tmp_path / "base")
    store = Store.local(tmp_path / "store")
    procs = [cli(store, "register", str(raw), "--name", "x", "--no-smoke", "--model-path", str(base), env=env)
             for _ in range(4)]
    for p in procs:
        timed(p)
    assert sorted(int(p.version) for p in store.snapshot().versions("x")) == [1, 2, 3, 4]
    consistent(store)


def test_cli_refuses_alias_shadowing(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    support, legal = tiny_adapter(tmp_path / "support", seed=1), tiny_adapter(tmp_path / "legal", seed=2)
    base = fake_base(tmp_path / "base")
    store = Store.local(tmp_path / "store")
    timed(cli(store, "register", str(support), "--name", "hijacker", "--aliases", "newname", "--no-smoke",
              "--model-path", str(base), env=env))
    refused = cli(store, "register", str(legal), "--name", "newname", "--no-smoke", "--model-path", str(base),
                  env=env)
    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 1 and "name 'newname' is already an alias of hijacker" in err
    assert [p.name for p in store.snapshot().passports] == ["hijacker"]
    assert json.loads((store.root / "registry.json").read_text())["adapters"][0]["aliases"] == ["newname"]
