"""LoRA where it applies: a server wraps (and reserves slot stacks for) only the linear layers its
servable adapters adapt, or those --lora-target-modules names, and refuses an adapter that
adapts any other with ADAPTER_INCOMPATIBLE, naming the module, at every way in: a request, an
admin warm, and the engine's own read of the weights (a passport that under-states its targets)."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import pytest

from conftest import PROMPT, ServerThread, clone_adapter, fetch_on, server_config
from loraserve.v1 import admin_pb2 as apb
from loraserve.v1 import admin_pb2_grpc
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc
from loraserve.registry.store import Store
from loraserve.runner.config import EngineConfig
from loraserve.runner.engine import TorchEngine
from loraserve.scheduler.errors import AdapterIncompatible
from loraserve.scheduler.types import AdapterRef
from test_generate import details
from loraserve.tools.bench.synth import make_store


@pytest.fixture(scope="module")
def store(demo_dir, tmp_path_factory):
    """Servable: qv0, qv1 (q_proj, v_proj) and o0 (o_proj). Not servable, so not counted: an
    archived copy of the demo's legal (all seven linears) and one trained for another base."""
    root = tmp_path_factory.mktemp("targets")
    make_store(demo_dir / "base", root, 2, rank=4, targets=["q_proj", "v_proj"], prefix="qv")
    other = make_store(demo_dir / "base", tmp_path_factory.mktemp("other"), 1, rank=8, targets=["o_proj"], prefix="o")
    shutil.move(other.version_dir("o0", "1").parent, root / "o0")
    Store.local(root).reindex()
    clone_adapter(demo_dir, root, "legal", "retired", status="archived")
    clone_adapter(demo_dir, root, "medical", "elsewhere", base_model_revision="0" * 64)
    # Its passport says q_proj and v_proj; its weights adapt all seven linears.
    clone_adapter(demo_dir, root, "support", "understated", target_modules=["q_proj", "v_proj"])
    return root


def generate(channel, adapter: str):
    return inference_pb2_grpc.InferenceServiceStub(channel).Generate(
        pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=8), timeout=60)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert details(err)[0].reason == "ADAPTER_INCOMPATIBLE"
    return err


def test_only_the_modules_servable_adapters_adapt_are_wrapped_and_reserved(demo_dir, store):
    srv = ServerThread(server_config(demo_dir, adapters_dir=store, max_loras=4, max_lora_rank=8))
    every = TorchEngine(EngineConfig(demo_dir / "base", dtype=srv.server.engine.cfg.dtype, max_loras=4,
                                     max_lora_rank=8))
    asyncio.run(every.start())
    try:
        engine = srv.server.engine
        assert engine.lora_modules() == {"q_proj", "v_proj", "o_proj"}
        assert set(engine._adapters.layers) == {p for p in every._adapters.layers
                                                if p.rsplit(".", 1)[-1] in engine.lora_modules()}
        assert every.lora_modules() == engine.linear_modules() == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        # The stacks hold (in + out) x max_lora_rank per slot (4 and the base's) for the wrapped layers only.
        wrapped = sum(layer.in_features + layer.out_features for layer in engine._adapters.layers.values())
        everything = sum(layer.in_features + layer.out_features for layer in every._adapters.layers.values())
        itemsize = engine._dtype.itemsize
        assert engine.stack_bytes() == 5 * 8 * wrapped * itemsize
        assert every.stack_bytes() == 5 * 8 * everything * itemsize
        assert engine.stack_bytes() < every.stack_bytes() / 2  # the demo's MLP is most of a layer's width
        with srv.channel() as ch:
            assert [generate(ch, name).adapter.id for name in ("qv0", "o0")] == ["qv0", "o0"]
    finally:
        asyncio.run(every.close())
        srv.stop()


def test_an_adapter_of_an_unwrapped_module_is_refused_naming_it(demo_dir, store):
    srv = ServerThread(server_config(demo_dir, adapters_dir=store, lora_target_modules=("q_proj", "v_proj")))
    try:
        assert srv.server.engine.lora_modules() == {"q_proj", "v_proj"}
        with srv.channel() as ch:
            assert generate(ch, "qv1").adapter.id == "qv1"
            # The registry's gate: the passport names o_proj.
            err = refused(lambda: generate(ch, "o0"))
            assert "o_proj" in err.details() and "--lora-target-modules" in err.details()
            admin = admin_pb2_grpc.AdapterAdminServiceStub(ch)
            err = refused(lambda: admin.WarmAdapter(apb.WarmAdapterRequest(adapter_id="o0"), timeout=30))
            assert "o_proj" in err.details()
            # The engine's read: the passport passes the gate, the weights adapt k_proj and more.
            err = refused(lambda: generate(ch, "understated"))
            assert "--lora-target-modules" in err.details() and "_proj" in err.details()
            assert generate(ch, "qv0").adapter.id == "qv0"  # and nothing else is disturbed
    finally:
        srv.stop()


def test_the_engine_refuses_weights_for_a_layer_it_does_not_wrap(demo_dir):
    engine = TorchEngine(EngineConfig(demo_dir / "base", lora_target_modules=("q_proj", "k_proj", "v_proj")))
    ref = AdapterRef("legal", "1", str(demo_dir / "adapters" / "legal" / "1"))

    with pytest.raises(AdapterIncompatible, match=r"(o|gate|up|down)_proj .*restart it with --lora-target-modules"):
        fetch_on(engine, ref)
    assert engine.lora_modules() == {"q_proj", "k_proj", "v_proj"}


def test_a_target_module_that_is_no_linear_layer_fails_start_up(demo_dir, store):
    srv = ServerThread(server_config(demo_dir, adapters_dir=store, lora_target_modules=("q_proj", "embed_tokens")),
                       load=False)
    try:
        with pytest.raises(ValueError, match="embed_tokens, which LoRA cannot apply to"):
            srv.call(srv.server.load())
    finally:
        srv.stop()
