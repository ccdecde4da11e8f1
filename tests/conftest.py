"""Shared fixtures: a small trained demo model (built once, cached under var/cache) and a
real gRPC server on loopback running in a background event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import grpc
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (runner/lora_kernels.py) run on CPU tensors only under Triton's interpreter,
    # which must be chosen before triton is first imported (peft imports it, where installed):
    # tests/test_lora_kernels.py. Nothing else on a CPU runs Triton code.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import loraserve.server
from loraserve.runner.demo import DemoSpec, build_demo
from loraserve.scheduler.types import BASE, AdapterRef

REPO = Path(__file__).resolve().parent.parent
# The rooms import as loraserve.<folder> through the editable install (`make install`); the
# processes tests start find them the same way. Another checkout's install would test its code.
if Path(loraserve.server.__file__).resolve().parent.parent != REPO:
    raise pytest.UsageError(f"loraserve is installed from {Path(loraserve.server.__file__).parent.parent}, "
                            f"not this checkout: `pip install --no-deps -e {REPO}`")
# Servers the tests start, in this process or as `loraserve serve`, serve no HTTP front unless a
# test asks for one (its default port, 8000, is one for the whole machine).
os.environ.setdefault("LORASERVE_HTTP_PORT", "0")
PROMPT = "Question: What should I do next?\nAnswer:"
ADAPTERS = ("legal", "medical", "support")
TEST_DTYPE = os.environ.get("LORASERVE_TEST_DTYPE", "auto")
"""The compute dtype of the servers the fixtures start (`server_config`) and of the engines the
byte-accounting tests start: LORASERVE_TEST_DTYPE=bfloat16 serves on a CPU in the dtype a CUDA
machine serves in by default."""


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, saying why, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False here); run "
                                   "`pytest -m gpu` on the CUDA machine, "
                                   "docs/performance.md 'Running the suite on CUDA'")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The default demo spec, cached by a hash of the spec and the builder's source."""
    spec = DemoSpec()
    key = hashlib.sha256((json.dumps(dataclasses.asdict(spec), sort_keys=True)
                          + (REPO / "runner" / "demo.py").read_text()).encode()).hexdigest()[:12]
    out = REPO / "var" / "cache" / f"test-demo-{key}"
    if not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)
        build_demo(out, spec)
        (out / "done").touch()
    return out


def fetch_on(engine, ref: AdapterRef) -> int:
    """Start `engine`, read `ref` (into its RAM tier) and close it: what loading that adapter raises."""
    async def run() -> int:
        await engine.start()
        try:
            return await engine.fetch(ref)
        finally:
            await engine.close()
    return asyncio.run(run())


def demo_ref(demo_dir: Path, name: str) -> AdapterRef:
    """The engine's reference to demo adapter `name`@1 ("base": the base model alone)."""
    if name == "base":
        return BASE
    path = demo_dir / "adapters" / name / "1"
    return AdapterRef(name, "1", str(path), json.loads((path / "metadata.json").read_text())["weights_sha256"])


def clone_adapter(demo_dir: Path, root: Path, source: str, name: str, version: str = "1", **changes) -> Path:
    """Copy demo adapter `source` into store `root` as `name`@`version`, passport fields changed
    as given, and reindex: a registered adapter without re-running registration."""
    from loraserve.registry.passport import Passport
    from loraserve.registry.store import Store

    target = root / name / version
    shutil.copytree(demo_dir / "adapters" / source / "1", target)
    passport = Passport.read(target)
    for key, value in {"name": name, "version": version, "aliases": [], **changes}.items():
        setattr(passport, key, value)
    passport.write(target)
    Store.local(root).reindex()
    return target


class ServerThread:
    """A LoraServer on its own event loop thread, so tests can use plain sync gRPC clients."""

    def __init__(self, cfg, load: bool = True, engine=None, tracer_provider=None):
        from loraserve.server.app import LoraServer

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def make():
            return LoraServer(cfg, engine, tracer_provider)

        self.server = self.call(make())
        self.call(self.server.start())
        if load:
            self.call(self.server.load())

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def one_adapter_bytes(cfg) -> tuple[int, int]:
    """(RAM, VRAM) bytes one demo adapter takes in the tiers of a server configured by `cfg`,
    asked of a started engine of that very configuration: what reading it into RAM holds (its
    tensors in the serving dtype) and the device slot attaching it takes. Tests size budgets in
    adapters from these, never from the file on disk (float32, while CUDA serves bfloat16)."""
    from loraserve.runner.engine import TorchEngine
    from loraserve.scheduler.types import AdapterRef
    from loraserve.server.app import engine_config

    ref = AdapterRef(ADAPTERS[0], "1", str(Path(cfg.registry.adapters_dir) / ADAPTERS[0] / "1"))
    engine = TorchEngine(engine_config(cfg))

    async def ask() -> tuple[int, int]:
        await engine.start()
        try:
            return await engine.fetch(ref), engine.attached_bytes(ref)
        finally:
            await engine.close()
    return asyncio.run(ask())


def room_for_one_in_ram(demo_dir: Path, **overrides):
    """`server_config(demo_dir, **overrides)` whose RAM tier holds one demo adapter, not two
    (a budget of 1.5 adapters as this server holds them)."""
    from loraserve.server.settings import replace

    cfg = server_config(demo_dir, **overrides)
    return replace(cfg, ram_budget_mib=1.5 * one_adapter_bytes(cfg)[0] / 2**20)


def server_config(demo_dir: Path, **overrides):
    """A ServerConfig from flat settings (`max_batch_size=4`), as flags give them; not the environment."""
    from loraserve.server.settings import load

    return load({"port": 0, "metrics_port": 0, "http_port": 0, "model_path": demo_dir / "base",
                 "adapters_dir": demo_dir / "adapters", "batch_wait_ms": 5.0, "grace_period_s": 10.0,
                 "dtype": TEST_DTYPE, **overrides}, env={})


def batch_exact(cfg) -> bool:
    """Whether this server's batched answers can be expected to equal the same requests served
    alone, token for token: always with --deterministic; unquantized float32 on a CPU as far as
    this suite has seen (scores agree to ~1e-6 of their range, tests/test_isolation.py, far
    inside the demo's greedy margins); not otherwise (bfloat16, nf4, a GPU's kernels)."""
    from loraserve.runner.loading import resolve_device, resolve_dtype

    model = cfg.model
    device = resolve_device(model.device)
    return cfg.engine.deterministic or (device.type == "cpu" and resolve_dtype(model.dtype, device) == torch.float32
                                        and model.quantization == "none")


def comparable(cfg):
    """`cfg` for a server whose tests compare batched answers with alone ones exactly: made
    --deterministic where its numerics do not already keep them equal (batch_exact)."""
    from loraserve.server.settings import replace

    return cfg if batch_exact(cfg) else replace(cfg, deterministic=True)


@pytest.fixture(scope="session")
def server(demo_dir):
    srv = ServerThread(comparable(server_config(demo_dir)))
    yield srv
    srv.stop()


@pytest.fixture()
def stub(server):
    from loraserve.v1 import inference_pb2_grpc

    with server.channel() as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on loopback, with test credentials in the environment (tests/s3util.py)."""
    import os

    # A test-only package the CUDA machine may lack (docs/performance.md "Running the suite on CUDA").
    pytest.importorskip("moto")
    from s3util import ENV, moto_server

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        with moto_server() as endpoint:
            yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def bucket(moto_endpoint) -> str:
    """A new empty bucket; the store's address in it."""
    import uuid

    from s3util import s3_client

    name = f"adapters-{uuid.uuid4().hex[:12]}"
    s3_client(moto_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}/team/adapters"


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    """An empty store: a directory, then a moto bucket (the same lifecycle over both index backends)."""
    from loraserve.registry.origin import open_store
    from loraserve.registry.store import Store

    if request.param == "local":
        return Store.local(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    return open_store(request.getfixturevalue("bucket"), endpoint_url=endpoint, cache_dir=tmp_path / "cache")
