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


def test_compose_wires_prometheus_alertmanager_and_grafana_to_the_shipped_files():
    services = COMPOSE["services"]
    deploy = REPO / "deploy"
    for name in ("prometheus", "alertmanager", "grafana"):
        for volume in services[name]["volumes"]:
            assert (deploy / volume.split(":")[0]).exists(), volume
    prometheus = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert all((deploy / "prometheus" / f).exists() for f in prometheus["rule_files"])
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == ["loraserve:9464"] and "9464:9464" in services["loraserve"]["ports"]
    assert services["loraserve"]["environment"]["LORASERVE_METRICS_HOST"] == "0.0.0.0"
    managers = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert managers == ["alertmanager:9093"] and "9093:9093" in services["alertmanager"]["ports"]
    source = yaml.safe_load((deploy / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090" and source["datasources"][0]["isDefault"]
    provider = yaml.safe_load((deploy / "grafana" / "provisioning" / "dashboards" / "loraserve.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert f"./grafana/loraserve.json:{dashboards}/loraserve.json:ro" in services["grafana"]["volumes"]
