"""The Ray Serve deployment with two replicas on this machine (skipped without the `ray` extra)."""

from __future__ import annotations

import pytest

from conftest import ADAPTERS, PROMPT

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def ray_app(demo_dir):
    from loraserve.tools.ray_serve import app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(app({"model_path": str(demo_dir / "base"), "adapters_dir": str(demo_dir / "adapters"),
                                "num_replicas": 2}), name="loraserve", route_prefix=None)
        yield handle
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_each_adapter_like_the_grpc_server(ray_app, stub):
    from loraserve.v1 import inference_pb2 as pb

    replicas = serve.status().applications["loraserve"].deployments["LoraServeDeployment"].replica_states
    assert replicas.get("RUNNING") == 2, replicas

    for adapter in (*ADAPTERS, "base"):
        expected = stub.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=8),
                                 timeout=60).text
        for _ in range(2):
            got = ray_app.options(multiplexed_model_id=adapter).generate.remote(PROMPT, max_new_tokens=8).result(
                timeout_s=120)
            assert (got["adapter_id"], got["text"]) == (adapter, expected)


def test_unknown_adapter_is_a_clear_error(ray_app):
    with pytest.raises(Exception, match="ADAPTER_NOT_FOUND|not served here"):
        ray_app.options(multiplexed_model_id="nope").generate.remote(PROMPT).result(timeout_s=120)
