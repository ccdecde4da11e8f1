"""Docker is not available here, so the Dockerfile and compose file are linted: they must agree
with each other and with the repository."""

from __future__ import annotations

import re

import yaml

from conftest import REPO
from server.config import ServerConfig

DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


def _instructions(keyword: str) -> list[str]:
    return re.findall(rf"^{keyword}\s+(.+)$", DOCKERFILE, re.M)


def test_dockerfile_cuda_base_non_root_health_check_and_real_sources():
    assert _instructions("FROM")[0].startswith("nvidia/cuda:")
    user = _instructions("USER")
    assert user and user[-1] not in ("root", "0")
    assert _instructions("HEALTHCHECK") and "HealthStub" in DOCKERFILE
    for copy in _instructions("COPY"):
        *sources, _ = copy.split()
        assert all((REPO / s).exists() for s in sources), copy
    env = dict(re.findall(r"(LORASERVE_[A-Z_]+)=(\S+)", DOCKERFILE))
    fields = {f"LORASERVE_{name.upper()}" for name in ServerConfig.__dataclass_fields__}
    assert set(env) <= fields, set(env) - fields
    assert env["LORASERVE_HOST"] == "0.0.0.0"


def test_compose_wires_loraserve_to_jaeger_with_the_store_as_volumes():
    services = COMPOSE["services"]
    app, jaeger = services["loraserve"], services["jaeger"]
    build = REPO / "deploy" / app["build"]["context"]
    assert (build / app["build"]["dockerfile"]).resolve() == (REPO / "Dockerfile").resolve()
    assert "jaeger" in app["depends_on"]
    endpoint = app["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host, port = re.match(r"http://([^:]+):(\d+)$", endpoint).groups()
    assert host == "jaeger" and any(p.split(":")[-1] == port for p in jaeger["ports"])
    assert str(jaeger["environment"]["COLLECTOR_OTLP_ENABLED"]) == "true"
    env = dict(re.findall(r"(LORASERVE_[A-Z_]+)=(\S+)", DOCKERFILE))
    mounts = {re.search(r":(/[^:]+)(?::ro|:rw)?$", v).group(1) for v in app["volumes"]}
    assert {env["LORASERVE_MODEL_PATH"], env["LORASERVE_ADAPTERS_DIR"]} <= mounts
    assert any(p.split(":")[-1] == "50051" for p in app["ports"])
